"""Run logging: metrics.jsonl (one JSON object per step), completions.jsonl (sampled
completions every N steps), a tqdm bar, and optionally wandb or tensorboard."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

BAR_KEYS = ("reward", "kl", "loss")


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, total_steps: int, initial_step: int = 0,
                 report_to: str = "none", config: dict | None = None, progress_bar: bool = True,
                 desc: str = "grpo", prefix: str = ""):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / f"{prefix}metrics.jsonl"
        self.completions_path = self.run_dir / f"{prefix}completions.jsonl"
        # A resumed run rewinds its logs to the checkpoint, so no step appears twice.
        for path in (self.metrics_path, self.completions_path):
            truncate_jsonl(path, initial_step)
        self.bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
        self.backend = _open_backend(report_to, self.run_dir, config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        append_jsonl(self.metrics_path, record)
        if self.backend is not None:
            self.backend(step, metrics)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in BAR_KEYS if k in metrics}, refresh=False)
            self.bar.update(step - self.bar.n)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            append_jsonl(self.completions_path, {"step": step, **row})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, in order. A line that is not one (cut by a crash,
    or edited by hand) is skipped with a warning naming it; the lines after it are kept."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            rows.append(record)
        else:
            bad.append(lineno)
    if bad:
        warnings.warn(f"{path}: skipped line(s) {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}, "
                      "which are not JSON records (a line cut by a crash, or an edit); the other lines are kept.",
                      stacklevel=2)
    return rows


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records with step <= last_step (atomic rewrite); damaged lines are dropped
    (`read_jsonl` says which), every valid one before the step is kept."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def _open_backend(report_to: str, run_dir: Path, config: dict):
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise RuntimeError("report_to=wandb but wandb is not installed: pip install 'grpo[wandb]'.") from None
        run = wandb.init(config=config, dir=str(run_dir))
        return lambda step, m: run.log(m, step=step)
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("report_to=tensorboard but tensorboard is not installed: pip install tensorboard.") from None
        writer = SummaryWriter(str(run_dir / "tb"))

        def write(step, metrics):
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(k, v, step)
        return write
    return None
