"""Plots of a run's metrics: `python -m grpo.plot RUN_DIR` -> RUN_DIR/plots/*.png.

Reads RUN_DIR/metrics.jsonl (one JSON object per step, as `grpo.metrics.MetricsLogger`
writes) and, when present, RUN_DIR/sft/metrics.jsonl. Each figure shows the raw values as
faint points and a smoothed line (a bias-corrected exponential moving average, the
TensorBoard smoother), against the step. A figure whose metrics the run did not log is
skipped. matplotlib is the optional extra `plot` (`pip install 'grpo[plot]'`); it is
imported only when plotting, with the Agg backend (no display needed).

Figures: reward.png (total, and one line per reward function `rewards/<name>`),
accuracy.png (`rewards/correctness*` and the eval `eval/pass@1`), format.png (the sampled
completions' `truncated_frac` and the eval's `eval/format_rate` and `eval/truncated_rate`),
kl.png, completion_length.png, loss.png, sft_loss.png.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from grpo.metrics import read_jsonl

__all__ = ["plot_run", "series", "smooth", "main"]

SMOOTHING = 0.6  # EMA weight of the past (TensorBoard's default); 0 = no smoothing


class PlotError(RuntimeError):
    """A run that cannot be plotted (no metrics, or matplotlib missing); the message says why."""


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that hold a finite number for it.

    Non-finite values (logged as the strings "nan"/"inf") and missing keys are skipped.
    """
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, bool) or v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            steps.append(int(r.get("step", len(steps))))
            values.append(v)
    return steps, values


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average: s_t = m_t / (1 - w^t), m_t = w m_{t-1} + (1-w) x_t.

    The correction makes the first points the plain mean so far instead of pulling them to
    0 (the Adam bias correction, Kingma & Ba 2015, sec. 3). Example (w = 0.5): [2, 4] ->
    [2, (0.5*0.5*2 + 0.5*4) / (1 - 0.25)] = [2, 3.333..].
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, m = [], 0.0
    for t, x in enumerate(values, 1):
        m = weight * m + (1 - weight) * x
        out.append(m / (1 - weight**t))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "plotting needs matplotlib, which is not installed: pip install 'grpo[plot]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, steps, values, label: str, color) -> None:
    ax.plot(steps, values, "o", ms=2.5, alpha=0.3, color=color)
    ax.plot(steps, smooth(values), "-", lw=1.8, color=color, label=label)


def _figure(plt, path: Path, title: str, ylabel: str, lines: list[tuple[str, list, list]],
            xlabel: str = "step", evals: list[tuple[str, list, list]] = ()) -> Path | None:
    """One axes: each (label, steps, values) of `lines` raw + smoothed; each of `evals`
    (sparse, e.g. eval/pass@1) as markers joined by a dashed line."""
    lines = [line for line in lines if line[1]]
    evals = [e for e in evals if e[1]]
    if not lines and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, steps, values) in enumerate(lines):
        _draw(ax, steps, values, label, colors[i % len(colors)])
    for j, (label, steps, values) in enumerate(evals, len(lines)):
        ax.plot(steps, values, "s--", ms=5, lw=1.2, color=colors[j % len(colors)], label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if lines:
        fig.text(0.99, 0.01, f"dots: raw values; lines: EMA-smoothed (weight {SMOOTHING})",
                 ha="right", va="bottom", fontsize=7, color="gray")
    if len(lines) + len(evals) > 1 or evals:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs of a run into RUN_DIR/plots/ and return their paths.

    Raises PlotError when the run has neither metrics.jsonl nor sft/metrics.jsonl with
    records, or when matplotlib is missing.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: no such run folder")
    records = read_jsonl(run / "metrics.jsonl")
    sft = read_jsonl(run / "sft" / "metrics.jsonl")
    if not records and not sft:
        raise PlotError(
            f"{run}: nothing to plot: no records in metrics.jsonl or sft/metrics.jsonl "
            "(pass the folder a training run wrote, e.g. runs/demo)"
        )
    plt = _pyplot()
    out = run / "plots"
    out.mkdir(exist_ok=True)
    keys = sorted({k for r in records for k in r})
    reward_keys = [k for k in keys if k.startswith("rewards/") and not k.endswith("_std")]
    accuracy_keys = [k for k in reward_keys if k.split("/", 1)[1].startswith("correctness")]
    eval_keys = [k for k in keys if k.startswith("eval/pass@")]
    eval_format_keys = [k for k in ("eval/format_rate", "eval/truncated_rate") if k in keys]

    def lines(*ks: str) -> list[tuple[str, list, list]]:
        return [(k, *series(records, k)) for k in ks]

    written = [
        _figure(plt, out / "reward.png", "Reward (total and per function)", "reward",
                lines("reward", *reward_keys)),
        _figure(plt, out / "accuracy.png", "Accuracy (training reward and eval)", "fraction correct",
                lines(*accuracy_keys), evals=lines(*eval_keys)),
        _figure(plt, out / "format.png", "Format and truncation (training samples and eval)",
                "fraction of completions", lines("truncated_frac"), evals=lines(*eval_format_keys)),
        _figure(plt, out / "kl.png", "KL to the reference policy", "KL (mean per token)", lines("kl")),
        _figure(plt, out / "completion_length.png", "Completion length", "tokens",
                lines("completion_length")),
        _figure(plt, out / "loss.png", "Training loss (policy + KL terms)", "loss", lines("loss")),
        _figure(plt, out / "sft_loss.png", "SFT loss (warm start)", "cross-entropy loss",
                [("sft loss", *series(sft, "loss"))]),
    ]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m grpo.plot RUN_DIR   (writes RUN_DIR/plots/*.png)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        paths = plot_run(argv[0])
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
