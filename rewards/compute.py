"""Weighted sum of reward functions over one batch of completions, with checked outputs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["RewardError", "compute_rewards"]


class RewardError(Exception):
    """A reward function raised, or returned something that is not one finite float
    (or None) per completion. The message names the function and, when known, the
    sample index and the start of its completion."""


class NonFiniteRewardError(RewardError):
    """A reward function returned NaN or inf. The trainer skips such a step (and stops
    after `max_nonfinite_steps` in a row) instead of failing at once."""


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def _preview(completion: Any, n: int = 80) -> str:
    """The start of a completion's text, for error messages."""
    text = completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        text = completion[-1].get("content", completion)
    text = text if isinstance(text, str) else repr(text)
    return repr(text[:n] + ("..." if len(text) > n else ""))


def _slice(values: Any, i: int, n: int) -> Any:
    """Sample i of a batch-aligned argument (a list of n), or the argument as is."""
    if isinstance(values, (list, tuple)) and len(values) == n:
        return values[i : i + 1]
    return values


def _failing_sample(fn: Callable, prompts: Any, completions: Sequence, columns: dict[str, Any]) -> int | None:
    """Index of the first sample on which `fn` alone raises, or None when none does
    (the failure depends on the batch). Only called once a batched call has raised."""
    n = len(completions)
    for i in range(n):
        try:
            fn(_slice(prompts, i, n), completions[i : i + 1], **{k: _slice(v, i, n) for k, v in columns.items()})
        except (Exception, SystemExit):
            return i
    return None


def _to_float(fn_name: str, i: int, v: Any, completion: Any) -> float:
    """One reward value as a float; None -> NaN; anything else is a RewardError."""
    if v is None:
        return math.nan
    if isinstance(v, numbers.Real):
        x = float(v)
    elif isinstance(v, torch.Tensor) and v.numel() == 1:
        x = float(v.item())
    else:
        raise RewardError(
            f"reward function {fn_name!r} returned a non-number for sample {i}: "
            f"{type(v).__name__} {v!r:.80} (expected a float or None); completion starts {_preview(completion)}"
        )
    if not math.isfinite(x):
        raise NonFiniteRewardError(
            f"reward function {fn_name!r} returned {x} for sample {i} (rewards must be finite; "
            f"return None for 'not applicable'); completion starts {_preview(completion)}"
        )
    return x


def compute_rewards(
    reward_funcs: Sequence[Callable],
    prompts: Any,
    completions: Sequence[Any],
    columns: dict[str, Sequence[Any]],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each reward function on the batch and sum their weighted values.

    reward_funcs: F functions `fn(prompts, completions, **columns) -> list[float | None]`
    prompts:      passed through as is (usually a list of B, aligned with completions)
    completions:  B completions (strings or chat-message lists)
    columns:      dataset columns, each a list of B (extra entries are passed through)
    weights:      F weights (default all 1.0)

    Returns `(total, per_func)`: total [B] float32 = sum over f of weights[f] *
    per_func[:, f], skipping None; a sample where every function returned None gets 0.0.
    per_func [B, F] float32 holds the raw values, NaN where a function returned None.

    Example: funcs (correctness -> [1.0, None], soft_format -> [0.5, 0.0]), weights
    [2.0, 1.0] -> total [2*1.0 + 0.5, 0.0] = [2.5, 0.0], per_func [[1.0, 0.5], [nan, 0.0]].
    """
    n_funcs, batch = len(reward_funcs), len(completions)
    if weights is None:
        weights = [1.0] * n_funcs
    if len(weights) != n_funcs:
        raise ValueError(f"got {len(weights)} reward weights for {n_funcs} reward functions; they must match")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"reward weights must be finite numbers, got {list(weights)}")
    for key, values in columns.items():
        if isinstance(values, (list, tuple)) and len(values) != batch:
            raise ValueError(f"column {key!r} has {len(values)} values for {batch} completions; they must match")

    per_func = torch.full((batch, n_funcs), math.nan, dtype=torch.float32)
    for f, fn in enumerate(reward_funcs):
        name = _name(fn)
        try:
            values = fn(prompts, completions, **columns)
        except (Exception, SystemExit) as exc:  # sys.exit() in a reward is a bug, not the end of the run
            i = _failing_sample(fn, prompts, completions, columns)
            where = f"on sample {i} (completion starts {_preview(completions[i])})" if i is not None else "on the batch"
            raise RewardError(
                f"reward function {name!r} raised {type(exc).__name__}: {exc} {where}; fix the function, "
                "or have it return None for a completion it cannot score"
            ) from exc
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardError(f"reward function {name!r} returned {type(values).__name__}, expected a list of {batch}")
        if len(values) != batch:
            raise RewardError(
                f"reward function {name!r} returned {len(values)} values for {batch} completions: "
                "return one float (or None) per completion, in order"
            )
        for i, v in enumerate(values):
            per_func[i, f] = _to_float(name, i, v, completions[i])

    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)  # [F]
    total = torch.nansum(per_func * w, dim=1)  # [B]; NaN (None) terms skipped, all-None -> 0.0
    return total, per_func
