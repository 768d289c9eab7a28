"""Resumable GSM8K evaluation for the long CPU runs (baseline, before/after training).

`grpo.evaluate.evaluate` run over fixed chunks of questions; each finished chunk is written
to `OUT/chunks/START.jsonl` (atomically), so a run that is stopped (end of a session,
kill -9) continues where it was with the same results: chunk `START` draws its samples from
a generator seeded with `seed + START`, whatever ran before it. At the end the chunks are
merged into `OUT/samples.jsonl` + `OUT/summary.json`, exactly as `test.py` writes them.

    summary = evaluate_resumable(model, tok, rows, "runs/x", fmt="xml", n_samples=8, k_list=(1, 8))
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

from grpo.evaluate import evaluate, summarize, write_results


def evaluate_resumable(model, tokenizer, rows: Sequence[dict], out_dir: str | Path, *,
                       fmt: str, n_samples: int, k_list: Sequence[int], chunk: int = 16,
                       seed: int = 0, meta: dict | None = None, log=print, **sampling) -> dict:
    """Evaluate `rows` chunk by chunk under `out_dir`, skipping chunks already on disk.

    `sampling`: temperature, top_p, max_new_tokens, max_prompt_length, batch_size (passed
    to `evaluate`). Returns the merged summary, with "wall_seconds" = the sum of the
    chunks' own evaluation times (model loading excluded) and `meta` merged in.
    """
    out = Path(out_dir)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    records, wall = [], 0.0
    for start in range(0, len(rows), chunk):
        path = out / "chunks" / f"{start:05d}.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            head, part = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
        else:
            t0 = time.time()
            _, part = evaluate(model, tokenizer, rows[start : start + chunk], fmt=fmt, k_list=k_list,
                               n_samples=n_samples, seed=seed + start, progress=False, **sampling)
            head = {"start": start, "wall_seconds": round(time.time() - t0, 1)}
            for r in part:
                r["index"] += start
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [head, *part]))
            tmp.replace(path)
            log(f"{out.name}: questions {start}-{start + len(part) - 1} in {head['wall_seconds']} s")
        records += part
        wall += head["wall_seconds"]
    summary = summarize(records, sorted(set(k_list)), n_samples)
    summary["wall_seconds"] = round(wall, 1)
    write_results(out, summary, records, meta)
    return summary | (meta or {})


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (Wilson 1927); stays inside [0, 1] and is
    sane at 0 successes, where the normal interval collapses to a point.

    Example: 0 of 200 -> (0.0, 0.0188); 100 of 200 -> (0.4314, 0.5686).
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be >= 1, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], *, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-question values (for pass@k,
    which is a mean of per-question estimates, not a count)."""
    import random

    if not values:
        raise ValueError("bootstrap_interval: no values")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def interval_text(value: float, lo: float, hi: float) -> str:
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
