"""AdamW and the learning-rate schedule (linear warmup, then cosine / linear / constant)."""

from __future__ import annotations

import functools
import math

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warmup: (step + 1) / (warmup_steps + 1), so the first step already moves.
    Then over the remaining steps, progress p in [0, 1): cosine 0.5 * (1 + cos(pi p)),
    linear 1 - p, constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_scheduler={kind!r}: choose cosine, linear or constant.")


def build_optimizer(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW over the trainable (LoRA) parameters; the fused kernel where the device has one."""
    if not params:
        raise ValueError("no trainable parameters: the model has no LoRA adapter with requires_grad=True.")
    device = params[0].device
    fused = device.type in ("cuda", "cpu") and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int, kind: str):
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
