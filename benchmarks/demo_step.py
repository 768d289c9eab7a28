"""Step time and peak memory of the embedded demo's GRPO step, 4-bit NF4 base vs full precision.

    python benchmarks/demo_step.py [--steps 4] [--write]

Each variant runs in a fresh subprocess (`train.py --config configs/demo.yaml --mode grpo`,
no SFT, so only GRPO steps are timed) and reports the median of the per-step wall times
from its metrics.jsonl after the first (warm-up) step, the median completion tokens/s, and
the process's peak RSS (resource.getrusage, so it includes the model and Python). This is
the figure that chose the CPU default of `load_in_4bit` (grpo/model.py: default_load_in_4bit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, write_section  # benchmarks/common.py (the script's folder)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Embedded demo: GRPO step on CPU, 4-bit vs full precision"

CHILD = r"""
import json, resource, sys
sys.argv = ["train.py"] + json.loads(sys.argv[1])
import train
code = train.main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def run_variant(load_in_4bit: bool, steps: int, out: Path) -> dict:
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--mode", "grpo", "--max_steps", str(steps),
            "--output_dir", str(out), "--load_in_4bit", str(load_in_4bit).lower(), "--save_steps", "0",
            "--progress_bar", "false"]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant load_in_4bit={load_in_4bit} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # drop warm-up
    return {
        "load_in_4bit": load_in_4bit,
        "step_s": statistics.median(m["rollout_s"] + m["update_s"] for m in metrics),
        "rollout_s": statistics.median(m["rollout_s"] for m in metrics),
        "update_s": statistics.median(m["update_s"] for m in metrics),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
        "peak_rss_mib": peak_kb / 1024,
        "steps_timed": len(metrics),
    }


def table(rows: list[dict]) -> str:
    lines = ["| base | step s (median) | rollout s | update s | completion tokens/s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'4-bit NF4' if r['load_in_4bit'] else 'fp32'} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | "
                     f"{r['update_s']:.2f} | {r['tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per variant (the first is not timed)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for load_in_4bit in (False, True):
            rows.append(run_variant(load_in_4bit, args.steps, Path(tmp) / f"4bit-{load_in_4bit}"))
            print(rows[-1], flush=True)
    out = table(rows)
    print(out)
    if args.write:
        text = (f"Measured {datetime.date.today()} on {machine()}, with `python benchmarks/demo_step.py --steps {args.steps} --write`: the demo "
                f"config's GRPO step (SmolLM2-135M-Instruct, LoRA r=16 on all projections, G=4, 8 completions "
                f"of up to 64 tokens, micro-batch 4, beta 0.04), median over {rows[0]['steps_timed']} steps after "
                f"a warm-up step.\n\n{out}\n")
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
