"""What a long run does when something goes wrong, so that no written work is lost.

- SIGINT / SIGTERM (`GracefulStop`): the current step finishes, a checkpoint is written,
  the run ends with a message saying how to resume; a second SIGINT abandons the step
  at once (KeyboardInterrupt; the last complete checkpoint stays).
- kill -9: checkpoints are written to a temporary folder and renamed (grpo.checkpoint),
  so the newest `checkpoint-N` is always complete; leftovers are removed on restart.
- NaN / inf in rewards, loss or gradients (`first_nonfinite`, `nonfinite_grad`): the
  update is skipped and counted; `max_nonfinite_steps` in a row stop the run with a
  `TrainingError` that says where the first NaN came from. No NaN weight is ever saved.
- A read-only or full output directory (`check_writable`): an error before training.
- CUDA out of memory during the rollout (`rollout_oom_message`): names the knobs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch import Tensor


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. NaNs every step); the message says where and what to try."""


# ---------------------------------------------------------------------------------------
# Signals


class GracefulStop:
    """Context manager: while active, the first SIGINT/SIGTERM sets `signal_name` instead of
    killing the process; the loop checks it between steps. A second SIGINT raises
    KeyboardInterrupt (abandon the step). Handlers are restored on exit. Only the main
    thread can install handlers; elsewhere this is a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name: str | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abandon the current step
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abandon the step; the last checkpoint is kept).", flush=True)

    def __enter__(self) -> "GracefulStop":
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            self._old.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()


def exit_code(signal_name: str) -> int:
    """The shell convention for a process ended by a signal: 128 + its number (SIGINT 130)."""
    return 128 + int(signal.Signals[signal_name])


# ---------------------------------------------------------------------------------------
# Non-finite values


def first_nonfinite(named: dict[str, Tensor | float | None], mask: Tensor | None = None) -> str | None:
    """The first named value holding NaN/inf, described: 'log-probs: 2 nan, 0 inf of 40
    values'; None when all are finite. `mask` [b, T] restricts [b, T] tensors to real tokens."""
    for name, value in named.items():
        if value is None:
            continue
        t = torch.as_tensor(value).detach()
        if mask is not None and t.shape == mask.shape:
            t = t[mask.bool()]
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            return (f"{name}: {int(torch.isnan(t).sum())} nan, {int(torch.isinf(t).sum())} inf "
                    f"of {t.numel()} values")
    return None


def nonfinite_grad(named_params: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """'gradients: nan/inf in NAME' for the first parameter whose gradient is not finite."""
    for name, p in named_params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"gradients: nan/inf in {name}"
    return None


def count_skipped_step(state, limit: int, problem: str, advice: str) -> None:
    """Count a step skipped for NaN/inf in `state` (skipped_steps, nonfinite_in_row, step
    already advanced); raise TrainingError, saying where, once `limit` came in a row."""
    state.skipped_steps += 1
    state.nonfinite_in_row += 1
    if state.nonfinite_in_row >= limit:
        raise TrainingError(
            f"{state.nonfinite_in_row} steps in a row (up to step {state.step}) had NaN/inf values; the last in "
            f"{problem}. No update was applied for them and no checkpoint holds NaN weights. {advice}; then "
            "continue from the last checkpoint with --resume_from_checkpoint latest."
        )


# ---------------------------------------------------------------------------------------
# Disk


def check_writable(directory: str | Path, what: str = "output_dir", holds: str = "checkpoints and metrics") -> None:
    """Create `directory` and write, sync and delete a small probe file in it, before any
    work; a failure (read-only, no permission, disk full, a file in the way) is a
    CheckpointError with the fix. `what` names the option, `holds` what goes there."""
    from grpo.checkpoint import CheckpointError

    path = Path(directory)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise CheckpointError(
            f"{what} {path} is not writable ({err.strerror or err}): {holds} go there. "
            f"Choose another --{what}, fix its permissions, or free disk space."
        ) from err
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# Memory


def rollout_oom_message(cfg, err: BaseException) -> str:
    """What to lower when the rollout runs out of GPU memory."""
    per_call = cfg.generation_batch_size or cfg.batch_size
    return (
        f"out of GPU memory while sampling completions ({str(err).splitlines()[0][:200]}). "
        f"The rollout holds the KV cache of {per_call} sequences of up to "
        f"{cfg.max_prompt_length} + {cfg.max_completion_length} tokens. Lower "
        f"`generation_batch_size` (now {cfg.generation_batch_size or 'batch_size = ' + str(cfg.batch_size)}; "
        f"sampling in smaller chunks gives the same completions), `max_completion_length` "
        f"(now {cfg.max_completion_length}) or `num_generations` (now {cfg.num_generations}); "
        "or set `fast_rollout_keep` false (frees the merged copy after each rollout)."
    )
