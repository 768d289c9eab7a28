"""Supervised warm start: teach the answer format on reasoning chains before RL.

The loss is the mean negative log-likelihood of the completion tokens only (the prompt is
masked out), computed with the same memory-light log-prob kernel as the GRPO loss. The
batch normalizer is the token count of the whole batch, so gradient accumulation over
micro-batches equals one big batch (under torchrun: the global batch, gradients summed
over ranks, as in grpo.distributed). Faults are handled as in GRPO (grpo.faults). Same
checkpoints (`OUTPUT_DIR/sft/checkpoint-N`) and metrics (`OUTPUT_DIR/sft/metrics.jsonl`)
as GRPO; the final adapter is `OUTPUT_DIR/sft/adapter`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from grpo import checkpoint as ckpt
from grpo import distributed, faults, rundir
from grpo.config import GRPOConfig
from grpo.metrics import MetricsLogger
from grpo.model import completion_logprobs, trainable_parameters
from grpo.optim import build_optimizer, build_scheduler
from grpo.precision import autocast, describe, resolve_cpu_dtype
from grpo.rollout import encode_prompts
from grpo.trainer import PromptStream, TrainerState


def encode_targets(tokenizer, targets: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion ids [B, T] right-padded, each ending in EOS (so the model learns to stop),
    and their mask [B, T]; targets longer than max_length are cut (and then have no EOS)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in targets]
    rows = [r[:max_length] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def sft_loss(model, batch: dict[str, torch.Tensor], num_tokens: int, method: str) -> torch.Tensor:
    """Sum of -log p(completion token) over this micro-batch / tokens in the whole batch."""
    logp = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                               batch["completion_mask"], method=method)  # [b, T]
    return -(logp * batch["completion_mask"]).sum() / num_tokens


class SFTTrainer:
    """Masked-completion SFT of the policy adapter on rows with `prompt` and a target."""

    def __init__(self, model, tokenizer, rows: list[dict], targets: list[str], config: GRPOConfig):
        from data import apply_chat_template

        if len(rows) != len(targets) or not rows:
            raise ValueError(f"SFT needs one target per row and at least one row; got {len(rows)} rows, {len(targets)} targets.")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # The learner's precision on CPU, as in GRPO (grpo.precision; the choice is cached).
        self.cpu_dtype, why = resolve_cpu_dtype(config.cpu_dtype, next(model.parameters()).device)
        self.examples = [{"prompt_text": apply_chat_template(tokenizer, r["prompt"]) if not isinstance(r["prompt"], str)
                          else r["prompt"], "target": t} for r, t in zip(rows, targets)]
        self.run_dir = Path(config.output_dir) / "sft"
        self.state = TrainerState()
        self.stream = PromptStream(self.examples, config.seed, self.state)
        self.dist = distributed.setup()
        distributed.check_config(config, self.dist)
        if self.dist.is_main and self.cpu_dtype is not None:
            print("SFT " + describe(self.cpu_dtype, why), flush=True)
        self.stop, self.stopped_by = faults.GracefulStop(), None
        self.optimizer = build_optimizer(trainable_parameters(model), lr=config.sft_learning_rate,
                                         weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2))
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=config.warmup_steps,
                                         total_steps=config.sft_steps, kind=config.lr_scheduler)

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    def batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        cfg = self.config
        prompt_ids, prompt_mask, _ = encode_prompts(self.tokenizer, [e["prompt_text"] for e in examples], cfg.max_prompt_length)
        completion_ids, completion_mask = encode_targets(self.tokenizer, [e["target"] for e in examples],
                                                         cfg.max_completion_length, device)
        return {"prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device),
                "completion_ids": completion_ids, "completion_mask": completion_mask}

    def train(self) -> Path:
        """Run to sft_steps; returns the adapter folder. Stopped by SIGINT/SIGTERM: a
        checkpoint is written and `stopped_by` names the signal (no adapter yet). The sft/
        folder is locked, and refused if it holds another run's warm start (`grpo.rundir`)."""
        cfg = self.config
        with rundir.open_run(self.run_dir, resume=bool(cfg.resume_from_checkpoint),
                             overwrite=cfg.overwrite_output_dir, main=self.dist.is_main):
            return self.run_steps()

    def run_steps(self) -> Path:
        """The loop of `train`, in a folder already claimed."""
        cfg = self.config
        if self.adapter_dir.is_dir():  # a finished warm start (e.g. the run is resumed): load it
            ckpt.load_adapter_weights(self.model, self.adapter_dir)
            if self.dist.is_main:
                print(f"SFT adapter already at {self.adapter_dir}: loaded it, skipping the warm start.")
            return self.adapter_dir
        main = self.dist.is_main
        if main:  # writable: probed by open_run
            ckpt.remove_temporaries(self.run_dir)
        distributed.barrier()
        if cfg.resume_from_checkpoint and ckpt.list_checkpoints(self.run_dir):
            saved = ckpt.load_checkpoint(ckpt.resolve_checkpoint("latest", self.run_dir), model=self.model,
                                         optimizer=self.optimizer, scheduler=self.scheduler, rank=self.dist.rank)
            for key in ("step", "epoch", "data_index", "prompts_drawn"):
                setattr(self.state, key, saved.get(key, 0))
        logger = MetricsLogger(self.run_dir, total_steps=cfg.sft_steps, initial_step=self.state.step,
                               progress_bar=cfg.progress_bar, desc="sft") if main else None
        self.model.train()
        try:
            with self.stop:
                while self.state.step < cfg.sft_steps:
                    metrics = self.step()
                    if logger is not None:
                        logger.log(self.state.step, metrics)
                    if distributed.any_rank(self.stop.requested):
                        self.stopped_by = self.stop.signal_name or "a signal on another rank"
                        self.save()
                        return self.run_dir
                    if cfg.save_steps and self.state.step % cfg.save_steps == 0:
                        self.save()
        finally:
            if logger is not None:
                logger.close()
        if main:
            ckpt.save_adapter(self.model, self.adapter_dir)
        distributed.barrier()
        return self.adapter_dir

    def step(self) -> dict[str, float]:
        """One optimizer step on sft_batch_size examples (this rank's share under torchrun)."""
        cfg = self.config
        t0 = time.perf_counter()
        batch = self.batch(self.stream.take(cfg.sft_batch_size)[self.dist.share(cfg.sft_batch_size, "sft_batch_size")])
        num_tokens = int(distributed.sum_scalars([float(batch["completion_mask"].sum())])[0])  # global batch
        loss_total = 0.0
        for i in range(0, batch["completion_ids"].shape[0], cfg.micro_batch_size):
            micro = {k: v[i : i + cfg.micro_batch_size] for k, v in batch.items()}
            with autocast(self.cpu_dtype):  # the decoder only: the log-prob kernel and loss stay float32
                loss = sft_loss(self.model, micro, num_tokens, cfg.logprob_method)
            loss.backward()
            loss_total += loss.item()
        params = trainable_parameters(self.model)
        distributed.all_reduce_grads_(params)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.state.step += 1
        problem = faults.first_nonfinite({"SFT loss": loss_total}) or faults.nonfinite_grad(
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad])
        if distributed.any_rank(problem is not None):
            self.optimizer.zero_grad(set_to_none=True)
            faults.count_skipped_step(self.state, cfg.max_nonfinite_steps, f"SFT {problem or 'another rank'}",
                                      "Check the SFT targets, or lower sft_learning_rate")
            return {"skipped": 1.0, "lr": lr}
        self.state.nonfinite_in_row = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = distributed.sum_scalars([loss_total])[0]
        return {"loss": loss_total, "grad_norm": float(grad_norm), "lr": lr,
                "tokens": num_tokens, "step_s": time.perf_counter() - t0}

    def save(self) -> Path:
        rng = distributed.gather_objects(ckpt.rng_state())
        path = self.run_dir / f"checkpoint-{self.state.step}"
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.state.step, model=self.model, optimizer=self.optimizer,
                                        scheduler=self.scheduler, rng_states=rng,
                                        trainer_state=asdict(self.state), config=self.config,
                                        keep=self.config.save_total_limit)
        distributed.barrier()
        return path
