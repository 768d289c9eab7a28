"""The GRPO loop: rollout -> rewards -> advantages -> mu passes of micro-batch updates -> log.

`Trainer.train()` reads like the algorithm (Shao et al. 2024, DeepSeekMath, Alg. 1, with
one policy update per rollout batch by default). Every formula lives in a pure function
elsewhere: advantages in `grpo.advantages`, losses and the k3 KL in `grpo.losses`,
log-probs in `grpo.logprobs` (from hidden states, never the full logits).

Where we depart from the paper, and why:
- The KL term uses the k3 estimator per token (Schulman 2020), as DeepSeekMath eq. 4 does,
  against a frozen reference *adapter* on the same base (no second model in memory).
- With num_iterations == 1 the old log-probs are the current ones detached (ratio = 1,
  the gradient is the plain policy gradient), which saves a forward pass, as TRL does.
- The sampler (a merged fast copy, maybe in another precision) is not the learner: its
  log-probs are recorded during the rollout, the gap is logged (`mismatch/*`), and each
  token's policy loss is weighted by min(pi_old / pi_sampler, C) (token-level truncated
  importance sampling, Yao et al. 2025; `sampler_correction`).
- Loss normalizers are those of the whole batch (`grpo.losses.aggregate`), so gradient
  accumulation over micro-batches gives exactly the gradient of one big batch; under
  torchrun the batch is the global one (`grpo.distributed`), so N ranks give the update of
  one process.
- Each prompt's completions are sampled from a stream seeded by (seed, the prompt's draw
  number), so they do not depend on the generation batch size or the number of ranks.
- Faults (`grpo.faults`): SIGINT/SIGTERM end the run after the step with a checkpoint;
  NaN/inf in rewards, loss or gradients skip the update (and stop the run after
  `max_nonfinite_steps` in a row); the output directory is probed before any work.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from grpo import checkpoint as ckpt
from grpo import distributed, faults, rundir
from grpo.advantages import zero_std_groups
from grpo.algorithms import ALGORITHMS, AdvantageInputs, fill_batch, informative_groups, shaped_rewards
from grpo.config import GRPOConfig
from grpo.fastgen import FastPolicy
from grpo.staticgen import resolve_decode
from grpo.critic import Critic
from grpo.losses import aggregate, mismatch_sums, objective, truncated_is_weights, value_loss
from grpo.metrics import MetricsLogger
from grpo.model import (
    attach_adapters,
    completion_logprobs,
    disable_cpu_4bit_packing,
    load_base_model,
    load_tokenizer,
    prepare_tokenizer,
    reference_model,
    trainable_parameters,
)
from grpo.optim import build_optimizer, build_scheduler
from grpo.precision import autocast, describe, resolve_cpu_dtype
from grpo.rollout import Rollout, generate_rollout, resolve_pad_token_id
from rewards import NonFiniteRewardError


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (one per rollout batch when num_iterations == 1)
    epoch: int = 0  # passes over the prompt dataset started
    data_index: int = 0  # position in the current epoch's shuffled order
    prompts_drawn: int = 0  # prompts taken from the stream so far (numbers each prompt's sampling seed)
    skipped_steps: int = 0  # steps whose update was skipped for NaN/inf
    nonfinite_in_row: int = 0  # consecutive such steps
    metrics: dict = field(default_factory=dict)  # the last step's metrics


class Callback:
    """Subclass and override what you need; `Trainer(callbacks=[...])` calls them in order."""

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


class PromptStream:
    """An endless stream of dataset rows, reshuffled each epoch with a seeded permutation.
    Its position (epoch, index) is part of the checkpoint, so a resumed run sees the same
    prompts as an uninterrupted one."""

    def __init__(self, rows: Sequence[dict], seed: int, state: TrainerState):
        if len(rows) == 0:
            raise ValueError("train_dataset is empty: give at least one prompt row.")
        self.rows, self.seed, self.state = rows, seed, state

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def take(self, n: int) -> list[dict]:
        out, order = [], self._order(self.state.epoch)
        while len(out) < n:
            if self.state.data_index >= len(order):
                self.state.epoch += 1
                self.state.data_index = 0
                order = self._order(self.state.epoch)
            out.append(self.rows[order[self.state.data_index]])
            self.state.data_index += 1
            self.state.prompts_drawn += 1
        return out


class Trainer:
    """GRPO (and its variants, chosen by `config.algorithm`) on a PEFT LoRA policy.

    model: a hub id / local dir / "embedded", a transformers causal LM (a LoRA adapter is
        attached), or a PeftModel whose `default` adapter is the policy.
    reward_funcs: callables `fn(prompts, completions, **columns) -> list[float | None]` or
        names in `rewards.REGISTRY` / dotted paths; default: `config.reward_funcs`.
    train_dataset: rows (dicts, or a `datasets.Dataset`) with a `prompt` (chat messages or
        a plain string) or a `question` (formatted with `config.prompt_format`); every other
        column (e.g. `answer`) is passed to the reward functions.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        reward_funcs: Sequence[Callable | str] | None = None,
        train_dataset: Any = None,
        config: GRPOConfig | None = None,
        *,
        reward_weights: Sequence[float] | None = None,
        eval_dataset: Any = None,
        callbacks: Sequence[Callback] = (),
    ):
        from rewards import get_reward

        self.config = cfg = config or GRPOConfig()
        self.dist = distributed.setup()  # one process, or this rank's place under torchrun
        distributed.check_config(cfg, self.dist)
        torch.manual_seed(cfg.seed)  # LoRA init and dropout
        self.model, self.tokenizer = _resolve_model(model, tokenizer, cfg)
        self.device = next(self.model.parameters()).device
        funcs = reward_funcs if reward_funcs is not None else cfg.reward_funcs
        self.reward_funcs = [get_reward(f) if isinstance(f, str) else f for f in funcs]
        self.reward_weights = list(reward_weights) if reward_weights is not None else cfg.reward_weights
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward functions: give one weight per function.")
        self.train_rows = prepare_rows(train_dataset, cfg.prompt_format, "train_dataset")
        self.eval_rows = prepare_rows(eval_dataset, cfg.prompt_format, "eval_dataset") if eval_dataset is not None else None
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.prompts = PromptStream(self.train_rows, cfg.seed, self.state)  # the same on every rank
        # CPU precision (grpo.precision): bf16 sampling copy and learner autocast where the CPU is fast at bf16.
        self.cpu_dtype, why = resolve_cpu_dtype(cfg.cpu_dtype, self.device)
        if self.dist.is_main and self.cpu_dtype is not None:
            print(describe(self.cpu_dtype, why), flush=True)
        self.fast_policy = (FastPolicy(self.model, dtype=self.cpu_dtype, keep=cfg.fast_rollout_keep)
                            if cfg.fast_rollout else None)  # built on first rollout
        # Compile only a copy that lives across rollouts: a rebuilt one would be compiled again each time.
        self.rollout_decode = resolve_decode(cfg.rollout_decode, self.device,
                                             plain_model=cfg.fast_rollout and cfg.fast_rollout_keep)
        # The algorithm is a choice of advantage function, policy loss and critic (grpo/algorithms.py).
        self.algorithm = ALGORITHMS[cfg.algorithm]
        self.critic = Critic(self.model, cfg) if self.algorithm.uses_critic else None
        self.optimizer = build_optimizer(
            trainable_parameters(self.model), lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        if self.critic is not None:  # its own param group (learning rate) and its own grad clipping
            self.optimizer.add_param_group({"params": self.critic.parameters(), "lr": cfg.critic_learning_rate})
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=cfg.warmup_steps,
            total_steps=cfg.max_steps * cfg.num_iterations, kind=cfg.lr_scheduler,
        )
        # Every trainable tensor, named (gradient all-reduce, NaN reports, the same start on every rank).
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.critic is not None:
            known = {id(p) for _, p in self.named_trainable}
            self.named_trainable += [(f"critic.{i}", p) for i, p in enumerate(self.critic.parameters()) if id(p) not in known]
        distributed.broadcast_params_([p for _, p in self.named_trainable])
        self.stop = faults.GracefulStop()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run to max_steps (or until SIGINT/SIGTERM: then the summary has "stopped_by"), with
        the output folder locked, and refused if it holds another run (`grpo.rundir`)."""
        cfg = self.config
        with rundir.open_run(cfg.output_dir, resume=bool(cfg.resume_from_checkpoint),
                             overwrite=cfg.overwrite_output_dir, main=self.dist.is_main, ignore=("sft",)):
            return self.run_steps()

    def run_steps(self) -> dict[str, Any]:
        """The loop of `train`, in a folder already claimed."""
        cfg = self.config
        run_dir = Path(cfg.output_dir)
        main = self.dist.is_main  # rank 0 writes; every rank reads
        if main:  # open_run has probed that the folder is writable: fail now, not at the first save hours later
            ckpt.remove_temporaries(run_dir)  # left by a process killed while saving
        distributed.barrier()
        if cfg.resume_from_checkpoint:
            self.resume(cfg.resume_from_checkpoint)
        if main:
            cfg.save(run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, total_steps=cfg.max_steps, initial_step=self.state.step,
                               report_to=cfg.report_to, config=cfg.to_dict(),
                               progress_bar=cfg.progress_bar) if main else None
        history, stopped_by = [], None
        try:
            with self.stop:
                while self.state.step < cfg.max_steps:
                    metrics = self.step()
                    if cfg.eval_steps and self.eval_rows and self.state.step % cfg.eval_steps == 0 and main:
                        metrics.update(self.evaluate())
                    history.append(metrics)
                    if logger is not None:
                        if self.state.step % cfg.logging_steps == 0:
                            logger.log(self.state.step, metrics)
                        if cfg.log_completions_steps and self.state.step % cfg.log_completions_steps == 0:
                            logger.log_completions(self.state.step, self._last_samples)
                    for cb in self.callbacks:
                        cb.on_step_end(self, metrics)
                    if distributed.any_rank(self.stop.requested):
                        stopped_by = self.stop.signal_name or "a signal on another rank"
                        break
                    if cfg.save_steps and self.state.step % cfg.save_steps == 0:
                        self.save()
                if not (run_dir / f"checkpoint-{self.state.step}").is_dir():  # the end is always saved
                    self.save()
        finally:
            if logger is not None:
                logger.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return summarize(history, self.state.step, run_dir) | ({"stopped_by": stopped_by} if stopped_by else {})

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1, format rate and lengths on the first eval_limit eval rows, as `test.py`."""
        from grpo.evaluate import evaluate

        cfg = self.config
        with autocast(self.cpu_dtype):
            summary, _ = evaluate(
                self.model, self.tokenizer, self.eval_rows[: cfg.eval_limit], fmt=cfg.prompt_format,
                max_new_tokens=cfg.max_completion_length, max_prompt_length=cfg.max_prompt_length,
                batch_size=cfg.generation_batch_size or cfg.batch_size, seed=cfg.seed, progress=False,
                # through the PEFT model, which is not compiled (see rollout_decode)
                decode="static" if self.rollout_decode == "compiled" else self.rollout_decode,
                bucket=cfg.rollout_bucket,
            )
        return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def step(self) -> dict[str, float]:
        """One step: sample and score, advantages, then num_iterations optimizer updates."""
        cfg = self.config
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        problem = None
        try:
            rows, rollout, rewards, per_func, sampling = self.sample_batch()  # B = P * G (this rank's share)
        except NonFiniteRewardError as err:
            problem = f"rewards: {err}"
        if distributed.any_rank(problem is not None):
            return self.skip_step(problem or "rewards (on another rank)", lr)
        t1 = time.perf_counter()
        train_rewards = shaped_rewards(rewards, rollout.completion_lengths, cfg)  # [B]: + overlong shaping
        zero_std = zero_std_groups(train_rewards, cfg.num_generations)  # [P]
        mask = self.loss_mask(rollout, zero_std)  # [B, T]
        old_logp, ref_logp = self.frozen_logprobs(rollout)
        old_values = self.critic_values(rollout) if self.critic is not None else None  # [B, T]
        inputs = AdvantageInputs(train_rewards, rollout.completion_mask, old_logp, ref_logp, old_values)
        adv, returns = self.advantages(inputs)  # [B] or [B, T]; value targets [B, T] or None
        value_targets = (old_values, returns) if self.critic is not None else None
        update = {}
        for _ in range(cfg.num_iterations):
            update = self.optimize(rollout, adv, mask, old_logp, ref_logp, value_targets)
            if "nonfinite" in update:
                return self.skip_step(update["nonfinite"], lr)
        t2 = time.perf_counter()
        self.state.step += 1
        self.state.nonfinite_in_row = 0
        all_rewards, all_per_func = distributed.gather_rows(rewards), distributed.gather_rows(per_func.to(rewards.device))
        local = {
            **update,
            **sampling,
            **({"overlong_penalty": (train_rewards - rewards).mean().item()} if cfg.overlong_penalty else {}),
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "completion_length": rollout.completion_lengths.float().mean().item(),
            "completion_length_max": rollout.completion_lengths.max().item(),
            "truncated_frac": rollout.truncated.float().mean().item(),
            "lr": lr,
            "rollout_s": t1 - t0,
            "update_s": t2 - t1,
            "tokens_per_s": rollout.num_tokens / max(t2 - t0, 1e-9),
        }
        # Sums over ranks: quantities already divided by global counts, and the throughput.
        metrics = distributed.reduce_metrics(local, sums={*UPDATE_SUMS, "tokens_per_s"}) | \
            reward_metrics(all_rewards, all_per_func, self.reward_names) | {"skipped_steps": self.state.skipped_steps}
        self._last_samples = [
            {"prompt": r["prompt_text"], "completion": c, "reward": float(rw), "answer": r.get("answer")}
            for r, c, rw in zip(_repeat(rows, cfg.num_generations), rollout.completion_texts, rewards)
        ]
        self.state.metrics = metrics
        return metrics

    def skip_step(self, problem: str, lr: float) -> dict[str, float]:
        """A step whose rewards, loss or gradients were not finite: no update, counted; after
        max_nonfinite_steps in a row, stop with where the NaN came from."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        faults.count_skipped_step(self.state, self.config.max_nonfinite_steps, problem,
                                  "Check the reward functions and the data, or lower learning_rate")
        print(f"step {self.state.step}: skipped, NaN/inf in {problem} "
              f"({self.state.nonfinite_in_row} in a row, limit {self.config.max_nonfinite_steps})", flush=True)
        self._last_samples = []
        self.state.metrics = {"skipped": 1.0, "skipped_steps": float(self.state.skipped_steps), "lr": lr}
        return dict(self.state.metrics)

    def advantages(self, inputs: AdvantageInputs):
        """The algorithm's advantages on the global batch (all ranks' rows), sliced back to
        this rank's rows: batch statistics are those of the whole batch."""
        if not self.dist.enabled:
            return self.algorithm.advantage(inputs, self.config)
        b, T = inputs.mask.shape
        gathered = AdvantageInputs(*(distributed.gather_rows(getattr(inputs, f.name)) for f in fields(inputs)))
        adv, returns = self.algorithm.advantage(gathered, self.config)
        rows = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        local = lambda x: None if x is None else (x[rows, :T] if x.dim() > 1 else x[rows])  # noqa: E731
        return local(adv), local(returns)

    # ------------------------------------------------------------------ pieces of a step
    def draw(self, n: int) -> tuple[list[dict], list[int]]:
        """This rank's share of the next n prompts of the stream and their sampling seeds."""
        first = self.state.prompts_drawn
        rows = self.prompts.take(n)
        seeds = [prompt_seed(self.config.seed, first + i) for i in range(n)]
        share = self.dist.share(n)
        return rows[share], seeds[share]

    def sample_batch(self) -> tuple[list[dict], Rollout, torch.Tensor, torch.Tensor, dict[str, float]]:
        """P prompt rows, their G completions each, task rewards [B] and per-function rewards [B, F].

        With dynamic sampling (DAPO, Yu et al. 2025, Sec. 3.2) groups whose (shaped) rewards
        are all equal are set aside and more prompts drawn, for at most max_resample_rounds
        extra rounds; if the batch is still short the set-aside groups fill it (their
        advantage is 0). The last dict holds the sampling metrics (empty without it)."""
        cfg = self.config
        P, G = cfg.prompts_per_step, cfg.num_generations  # P: global; each rank samples P / world
        rows, seeds = self.draw(P)
        rollout = self.generate(rows, seeds)
        rewards, per_func = self.score(rows, rollout)
        if not cfg.dynamic_sampling:
            return rows, rollout, rewards, per_func, {}
        draws = [(rows, rollout, rewards, per_func)]
        informative = [informative_groups(shaped_rewards(rewards, rollout.completion_lengths, cfg), G)]  # [P]
        rounds = 0
        while (missing := P - int(torch.cat(informative).sum())) > 0 and rounds < cfg.max_resample_rounds:
            rounds += 1
            rows, seeds = self.draw(missing)
            rollout = self.generate(rows, seeds)
            rewards, per_func = self.score(rows, rollout)
            draws.append((rows, rollout, rewards, per_func))
            informative.append(informative_groups(shaped_rewards(rewards, rollout.completion_lengths, cfg), G))
        drawn = torch.cat(informative)  # [groups drawn]
        groups = fill_batch(drawn.nonzero().flatten().tolist(), (~drawn).nonzero().flatten().tolist(), P)
        all_rows = [r for d in draws for r in d[0]]
        all_rewards = torch.cat([d[2] for d in draws])
        rollout = draws[0][1] if len(draws) == 1 else concat_rollouts([d[1] for d in draws], resolve_pad_token_id(self.tokenizer))
        index = torch.tensor([g * G + j for g in groups for j in range(G)], device=all_rewards.device)  # [B]
        metrics = {"groups_drawn": float(len(all_rows)), "resample_rounds": float(rounds),
                   "reward_sampled": all_rewards.mean().item()}  # over every completion drawn: unfiltered
        return ([all_rows[g] for g in groups], select_rows(rollout, index), all_rewards[index],
                torch.cat([d[3] for d in draws])[index.cpu()], metrics)

    def generate(self, rows: list[dict], seeds: list[int]) -> Rollout:
        """G completions per row, sampled in chunks of generation_batch_size completions;
        seeds: one sampling seed per row (`draw`)."""
        cfg = self.config
        texts = [self.prompt_text(r) for r in rows]
        for r, t in zip(rows, texts):
            r.setdefault("prompt_text", t)
        per_call = (cfg.generation_batch_size or cfg.batch_size) // cfg.num_generations
        # The fast copy is re-merged from the current adapter; log-probs still use self.model.
        sampler = self.fast_policy.refresh() if self.fast_policy is not None else self.model
        try:
            parts = [
                generate_rollout(
                    sampler, self.tokenizer, texts[i : i + per_call], group_size=cfg.num_generations,
                    max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_completion_length,
                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, generator=None,
                    prompt_seeds=seeds[i : i + per_call], decode=self.rollout_decode, bucket=cfg.rollout_bucket,
                )
                for i in range(0, len(texts), per_call)
            ]
        except torch.OutOfMemoryError as err:
            raise faults.TrainingError(faults.rollout_oom_message(cfg, err)) from err
        finally:
            if self.fast_policy is not None:
                self.fast_policy.release()  # frees the copy when fast_rollout_keep is false
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, resolve_pad_token_id(self.tokenizer))

    def prompt_text(self, row: dict) -> str:
        from data import apply_chat_template

        prompt = row["prompt"]
        return prompt if isinstance(prompt, str) else apply_chat_template(self.tokenizer, prompt)

    def score(self, rows: list[dict], rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted reward [B] and each function's reward [B, F] (NaN = not applicable)."""
        from rewards import compute_rewards

        G = self.config.num_generations
        repeated = _repeat(rows, G)
        prompts = [r["prompt"] for r in repeated]
        conversational = not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] if conversational else t for t in rollout.completion_texts]
        skip = {"prompt", "prompt_text"}
        columns = {k: [r.get(k) for r in repeated] for k in repeated[0] if k not in skip}
        total, per_func = compute_rewards(self.reward_funcs, prompts, completions, columns, self.reward_weights)
        return total.to(self.device), per_func

    def loss_mask(self, rollout: Rollout, zero_std: torch.Tensor) -> torch.Tensor:
        """[B, T] float: completion tokens that enter the loss."""
        cfg = self.config
        keep = torch.ones(rollout.completion_ids.shape[0], dtype=torch.bool, device=self.device)  # [B]
        if cfg.mask_truncated_completions:
            keep &= ~rollout.truncated
        if cfg.drop_zero_std_groups:
            keep &= ~zero_std.repeat_interleave(cfg.num_generations)
        return rollout.completion_mask.float() * keep[:, None]

    def micro_batches(self, batch_size: int) -> list[slice]:
        m = self.config.micro_batch_size
        return [slice(i, min(i + m, batch_size)) for i in range(0, batch_size, m)]

    def logprobs(self, rollout: Rollout, mb: slice, return_entropy: bool = False):
        """Log-probs [b, T] (and entropy) of micro-batch `mb` under the policy; the decoder
        under bf16 autocast where `cpu_dtype` chose bf16 (the output layer stays float32)."""
        with autocast(self.cpu_dtype):
            return completion_logprobs(
                self.model, rollout.prompt_ids[mb], rollout.prompt_mask[mb],
                rollout.completion_ids[mb], rollout.completion_mask[mb],
                temperature=self.config.temperature or 1.0, method=self.config.logprob_method,
                return_entropy=return_entropy,
            )

    def values(self, rollout: Rollout, mb: slice) -> torch.Tensor:
        """The critic's V(s_t) [b, T] of micro-batch `mb` (inside `critic.active()`), the decoder
        under the same autocast as `logprobs`."""
        with autocast(self.cpu_dtype):
            return self.critic.values(rollout.prompt_ids[mb], rollout.prompt_mask[mb],
                                      rollout.completion_ids[mb], rollout.completion_mask[mb])

    @torch.no_grad()
    def frozen_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Old policy log-probs (when num_iterations > 1, or when the KL goes into the reward)
        and reference log-probs (when beta > 0), each [B, T], computed once per rollout in the same
        micro-batches as the update, so that at step 0 the KL is exactly 0."""
        cfg = self.config
        self.model.train()
        old = ref = None
        batches = self.micro_batches(rollout.completion_ids.shape[0])
        if cfg.num_iterations > 1 or (cfg.kl_in_reward and cfg.beta > 0):  # the KL in the reward needs them
            old = torch.cat([self.logprobs(rollout, mb) for mb in batches])
        if cfg.beta > 0:
            with reference_model(self.model):
                ref = torch.cat([self.logprobs(rollout, mb) for mb in batches])
        return old, ref

    @torch.no_grad()
    def critic_values(self, rollout: Rollout) -> torch.Tensor:
        """V(s_t) [B, T] of the rollout under the current critic, in the update's micro-batches."""
        self.model.train()
        with self.critic.active():
            return torch.cat([self.values(rollout, mb) for mb in self.micro_batches(rollout.completion_ids.shape[0])])

    def optimize(self, rollout: Rollout, adv: torch.Tensor, mask: torch.Tensor,
                 old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                 value_targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """One optimizer step over the whole rollout (gradients summed over ranks). With a
        NaN/inf anywhere, no step: the returned dict has "nonfinite" = where it was."""
        stats = self.accumulate_gradients(rollout, adv, mask, old_logp, ref_logp, value_targets)
        distributed.all_reduce_grads_([p for _, p in self.named_trainable])
        problem = stats.pop("nonfinite", None) or faults.nonfinite_grad(self.named_trainable)
        if distributed.any_rank(problem is not None):
            self.optimizer.zero_grad(set_to_none=True)
            return {"nonfinite": problem or "the loss (on another rank)"}
        if self.critic is not None:  # clipped on its own: value gradients must not shrink the policy's
            stats["vf_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                self.critic.parameters(), self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf))
        return {**stats, "grad_norm": self.clip_and_step()}

    def accumulate_gradients(self, rollout: Rollout, adv: torch.Tensor, mask: torch.Tensor,
                             old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                             value_targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Backward over micro-batches; the gradients sum to those of the whole batch.

        adv [B] or [B, T], mask [B, T] (tokens in the loss), old_logp / ref_logp [B, T] or None,
        value_targets: (rollout values, returns), each [B, T], when there is a critic.
        """
        cfg = self.config
        self.model.train()
        norms = self.loss_normalizers(mask)
        totals = dict.fromkeys(("loss", "kl", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high"), 0.0)
        mismatch = []  # per micro-batch sums (grpo.losses.mismatch_sums)
        for mb in self.micro_batches(rollout.completion_ids.shape[0]):
            logp, entropy = self.logprobs(rollout, mb, return_entropy=True)  # [b, T]
            m = mask[mb]
            if (bad := faults.first_nonfinite({"policy log-probs": logp}, m)) is not None:
                totals["nonfinite"] = bad
            old = old_logp[mb] if old_logp is not None else logp.detach()
            weights = None
            if rollout.sampler_logp is not None:
                sampler = rollout.sampler_logp[mb]
                mismatch.append(mismatch_sums(old, sampler, rollout.completion_mask[mb], cfg.sampler_correction_cap))
                if cfg.sampler_correction == "tis":
                    weights = truncated_is_weights(old, sampler, cfg.sampler_correction_cap)  # [b, T]
            loss, stats = objective(
                logp, old, adv[mb], m, policy_loss=self.algorithm.policy_loss, aggregation=cfg.loss_type,
                norms=norms, eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high,
                ref_logp=ref_logp[mb] if ref_logp is not None else None, beta=cfg.beta,
                kl_in_loss=not cfg.kl_in_reward,  # else the penalty is already in the advantages
                bias_corrected_kl=cfg.use_bias_correction_kl, is_weights=weights)
            if "nonfinite" not in totals and (bad := faults.first_nonfinite(
                    {"reference log-probs": ref_logp[mb] if ref_logp is not None else None,
                     "advantages": adv[mb], "loss": loss.detach()}, m)) is not None:
                totals["nonfinite"] = bad
            loss.backward()
            totals["loss"] += loss.item()
            totals["kl"] += float(stats.get("kl_sum", 0.0))
            totals["entropy"] += float((entropy * m).sum())
            tokens = float(m.sum())  # the clip stats are masked means over this micro-batch
            totals["clip_ratio"] += float(stats["clip_frac"]) * tokens
            totals["clip_ratio_low"] += float(stats["clip_low_frac"]) * tokens
            totals["clip_ratio_high"] += float(stats["clip_high_frac"]) * tokens
            if value_targets is not None:
                for key, value in self.value_backward(rollout, mb, *value_targets, m, norms).items():
                    totals[key] = totals.get(key, 0.0) + value
        if value_targets is not None:
            totals["vf_clip_frac"] /= norms["num_tokens"]
        for key in ("kl", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high"):
            totals[key] /= norms["num_tokens"]  # token means over the batch
        return totals | (mismatch_metrics(mismatch) if mismatch else {})

    def loss_normalizers(self, mask: torch.Tensor) -> dict[str, int]:
        """The whole (global) batch's normalizers of `grpo.losses.aggregate`, mask [B, T]: every
        row counts as a sequence, also a row masked out of the loss (truncated, or in a
        zero-std group): GRPO's 1/G and Dr.GRPO's constant count every output (DeepSeekMath
        eq. 3; Dr.GRPO Sec. 3.2), a masked row adds 0 to the sum. Tokens are the kept ones."""
        sequences, tokens = distributed.sum_scalars([float(mask.shape[0]), float(mask.sum())])
        return dict(num_sequences=max(int(sequences), 1), num_tokens=max(int(tokens), 1),
                    max_completion_length=self.config.max_completion_length)

    def value_backward(self, rollout: Rollout, mb: slice, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, norms: dict[str, int]) -> dict[str, float]:
        """vf_coef * the clipped value loss of one micro-batch (token mean over the batch),
        backpropagated into the critic. old_values, returns [B, T]; mask [b, T]."""
        cfg = self.config
        with self.critic.active():  # forward and backward with the critic adapter on
            values = self.values(rollout, mb)  # [b, T]
            per_token, stats = value_loss(values, old_values[mb], returns[mb], mask, cfg.cliprange_value)
            loss = cfg.vf_coef * aggregate(per_token, mask, "bnpo", **norms)
            loss.backward()
        return {"vf_loss": loss.item(), "vf_clip_frac": float(stats["vf_clip_frac"]) * float(mask.sum()),
                "value_mean": float((values.detach() * mask).sum()) / norms["num_tokens"]}

    def clip_and_step(self) -> float:
        params = trainable_parameters(self.model)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def reward_names(self) -> list[str]:
        return [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(self.reward_funcs)]

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """checkpoint-{step} (rank 0 writes it; every rank's RNG state goes in). Never NaN
        weights: a non-finite trainable tensor is an error, and the older checkpoints stay."""
        cfg = self.config
        rng = distributed.gather_objects(ckpt.rng_state())  # collective: every rank calls it
        path = Path(cfg.output_dir) / f"checkpoint-{self.state.step}"
        if self.dist.is_main:
            bad = next((n for n, p in self.named_trainable if not bool(torch.isfinite(p).all())), None)
            if bad is not None:
                raise faults.TrainingError(f"refusing to save {path}: weight {bad} holds NaN/inf; "
                                           "the older checkpoints are kept. Resume from the last one.")
            path = ckpt.save_checkpoint(
                cfg.output_dir, self.state.step, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, rng_states=rng, trainer_state=asdict(self.state),
                config=cfg, keep=cfg.save_total_limit,
                extra_tensors={"critic": self.critic.state_dict()} if self.critic is not None else None,
            )
        distributed.barrier()  # a rank that stops next must not exit before the save
        return path

    def resume(self, spec: str) -> None:
        from grpo.config import check_resume_config, read_yaml

        path = ckpt.resolve_checkpoint(spec, self.config.output_dir)
        if (path / "config.yaml").is_file():  # another LoRA shape or algorithm: say so before loading
            check_resume_config(read_yaml(path / "config.yaml"), self.config, path)
        saved = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, rank=self.dist.rank)
        if self.critic is not None:
            self.critic.load_state_dict(ckpt.load_tensors(path, "critic"))
        for f in fields(TrainerState):
            if f.name in saved:
                setattr(self.state, f.name, saved[f.name])
        if self.dist.is_main:
            left = self.config.max_steps - self.state.step
            print(f"resumed from {path} at step {self.state.step}: "
                  + (f"{left} of max_steps={self.config.max_steps} left to run." if left > 0 else
                     f"nothing left to run (max_steps={self.config.max_steps}); raise --max_steps to train on."),
                  flush=True)


# ---------------------------------------------------------------------- helpers
UPDATE_SUMS = {"loss", "kl", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
               "vf_loss", "vf_clip_frac", "value_mean"}  # per-rank parts of global means


def mismatch_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """`mismatch/*` metrics of a rollout from its micro-batches' `grpo.losses.mismatch_sums`
    (token means over this rank's completion tokens; the max over them)."""
    tokens = max(sum(p["tokens"] for p in parts), 1.0)
    return {"mismatch/kl": sum(p["kl"] for p in parts) / tokens,
            "mismatch/logp_abs_diff_mean": sum(p["abs_diff"] for p in parts) / tokens,
            "mismatch/ratio_max": max(p["ratio_max"] for p in parts),
            "mismatch/truncated_frac": sum(p["truncated"] for p in parts) / tokens}


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the index-th prompt drawn in a run seeded `seed`."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63)


def _resolve_model(model: Any, tokenizer: Any, cfg: GRPOConfig):
    """(PeftModel with a trainable `default` adapter, prepared tokenizer) from what the user gave."""
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or str(model), trust_remote_code=cfg.trust_remote_code)
        model = load_base_model(str(model), load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code)
    elif tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if not name:
            raise ValueError("tokenizer=None needs a model loaded from a hub id or folder; pass the tokenizer.")
        tokenizer = load_tokenizer(cfg.tokenizer or name, trust_remote_code=cfg.trust_remote_code)
    if not hasattr(model, "peft_config"):
        model = attach_adapters(model, cfg, cfg.adapter_path)
    else:  # a PeftModel built by the caller: the one 4-bit compute path all the same
        disable_cpu_4bit_packing(model)
    return model, prepare_tokenizer(tokenizer)


def prepare_rows(dataset: Any, prompt_format: str, name: str) -> list[dict]:
    """Rows as dicts with a `prompt`; rows with only a `question` get the format's messages."""
    from data import make_prompt_rows

    if dataset is None:
        raise ValueError(f"{name} is required: give rows with a `prompt` or `question` column.")
    rows = [dict(r) for r in dataset]
    if not rows:
        raise ValueError(f"{name} is empty: give at least one row.")
    if "prompt" not in rows[0]:
        if "question" not in rows[0]:
            raise ValueError(f"{name} rows need a `prompt` or a `question` column; found {sorted(rows[0])}.")
        rows = make_prompt_rows(rows, prompt_format)
    return rows


def _repeat(rows: list[dict], g: int) -> list[dict]:
    return [r for r in rows for _ in range(g)]


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts sampled in several calls; pads prompts on the left, completions on the right."""
    def pad(ts: list[torch.Tensor], left: bool, value: int) -> torch.Tensor:
        width = max(t.shape[1] for t in ts)
        padded = [torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                  for t in ts]
        return torch.cat(padded)

    offsets = torch.tensor([0] + [int(p.prompt_indices.max()) + 1 for p in parts[:-1]]).cumsum(0)
    return Rollout(
        prompt_ids=pad([p.prompt_ids for p in parts], True, pad_id),
        prompt_mask=pad([p.prompt_mask for p in parts], True, 0),
        completion_ids=pad([p.completion_ids for p in parts], False, pad_id),
        completion_mask=pad([p.completion_mask for p in parts], False, 0),
        truncated=torch.cat([p.truncated for p in parts]),
        completion_texts=[t for p in parts for t in p.completion_texts],
        prompt_indices=torch.cat([p.prompt_indices + int(o) for p, o in zip(parts, offsets)]),
        group_size=parts[0].group_size,
        sampler_logp=None if any(p.sampler_logp is None for p in parts)
        else pad([p.sampler_logp for p in parts], False, 0),
    )


def select_rows(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """The rows `index` [B'] of a rollout, whole groups in order; prompt indices renumbered."""
    G = rollout.group_size
    return Rollout(
        prompt_ids=rollout.prompt_ids[index], prompt_mask=rollout.prompt_mask[index],
        completion_ids=rollout.completion_ids[index], completion_mask=rollout.completion_mask[index],
        truncated=rollout.truncated[index], completion_texts=[rollout.completion_texts[i] for i in index.tolist()],
        prompt_indices=torch.arange(index.numel(), device=index.device) // G, group_size=G,
        sampler_logp=rollout.sampler_logp[index] if rollout.sampler_logp is not None else None,
    )


def reward_metrics(rewards: torch.Tensor, per_func: torch.Tensor, names: list[str]) -> dict[str, float]:
    out = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
           "reward_min": rewards.min().item(), "reward_max": rewards.max().item()}
    for j, name in enumerate(names):
        col = per_func[:, j]
        out[f"rewards/{name}"] = col.nanmean().item() if (~col.isnan()).any() else float("nan")
    return out


def summarize(history: list[dict], step: int, run_dir: Path) -> dict[str, Any]:
    """What changed over the run: mean reward of the first and last few steps."""
    rewards = [h["reward"] for h in history if "reward" in h]  # skipped (NaN) steps have none
    k = max(1, min(5, len(rewards) // 2))
    return {
        "steps": step,
        "run_dir": str(run_dir),
        "reward_first": sum(rewards[:k]) / k if rewards else float("nan"),
        "reward_last": sum(rewards[-k:]) / k if rewards else float("nan"),
        "last_metrics": history[-1] if history else {},
    }
