"""Tests of grpo.plot: the smoother, the series reader, and the PNGs of a synthetic run."""

from __future__ import annotations

import json
import math
import sys

import pytest

from grpo.plot import PlotError, main, plot_run, series, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_smooth_hand_worked():
    # w = 0.5: m1 = 0.5*2 = 1 -> 1/(1-0.5) = 2; m2 = 0.5*1 + 0.5*4 = 2.5 -> 2.5/(1-0.25) = 3.333..
    assert smooth([2.0, 4.0], 0.5) == pytest.approx([2.0, 10 / 3], abs=1e-12)
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]  # no smoothing
    assert smooth([5.0] * 4, 0.9) == pytest.approx([5.0] * 4, abs=1e-12)  # a constant stays put
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], 1.0)


def test_series_skips_missing_and_non_finite():
    records = [{"step": 1, "kl": 0.1}, {"step": 2}, {"step": 3, "kl": "nan"}, {"step": 4, "kl": 0.4}]
    assert series(records, "kl") == ([1, 4], [0.1, 0.4])
    assert series(records, "absent") == ([], [])


def write_run(run, steps=30, sft=True, eval_every=10):
    run.mkdir()
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 0.1 * math.sin(s), "reward": s / steps + 0.1 * math.cos(3 * s),
               "rewards/correctness_reward": s / (2 * steps), "rewards/strict_format_reward": 0.3,
               "kl": 0.001 * s, "completion_length": 100 + s, "truncated_frac": 0.0}
        if s % eval_every == 0:
            rec["eval/pass@1"] = s / (3 * steps)
            rec["eval/format_rate"] = 0.5 + s / (3 * steps)
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if sft:
        (run / "sft").mkdir()
        (run / "sft" / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 11)))


def test_plot_run_writes_every_png(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    paths = plot_run(run)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "completion_length.png", "format.png", "kl.png", "loss.png", "reward.png",
                     "sft_loss.png"]
    for p in paths:
        assert p.parent == run / "plots"
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000


def test_plot_run_skips_what_was_not_logged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    assert [p.name for p in plot_run(run)] == ["loss.png"]


def test_plot_run_errors(tmp_path, capsys):
    with pytest.raises(PlotError, match="no such run folder"):
        plot_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="nothing to plot"):
        plot_run(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_run(run, steps=3, sft=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(PlotError, match=r"pip install 'grpo\[plot\]'"):
        plot_run(run)
