"""Step time and peak memory of a GRPO step, by variant: the 4-bit NF4 base against full
precision, or float32 against bfloat16 on CPU (`cpu_dtype`).

    python benchmarks/demo_step.py [--steps 4] [--write]                       # 4-bit vs fp32, the demo
    python benchmarks/demo_step.py --compare cpu_dtype [--steps 4] [--write]   # fp32 vs bf16, the demo
    python benchmarks/demo_step.py --compare cpu_dtype --config configs/smollm2-gsm8k.yaml \
        --set batch_size=16 --set max_completion_length=128 --steps 3 --write   # the GSM8K shape

Each variant runs in a fresh subprocess (`train.py --config CONFIG --mode grpo`, no SFT, so
only GRPO steps are timed) and reports the median of the per-step wall times from its
metrics.jsonl after the first (warm-up) step, the median completion tokens/s, the sampler /
learner mismatch, and the process's peak RSS (resource.getrusage, so it includes the model
and Python). The 4-bit table chose the CPU default of `load_in_4bit` (grpo/model.py:
default_load_in_4bit); the cpu_dtype table is what `cpu_dtype: auto` stands on.
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
SECTIONS = {"4bit": "## Embedded demo: GRPO step on CPU, 4-bit vs full precision",
            "cpu_dtype": "## GRPO step on CPU, float32 vs bfloat16 (cpu_dtype)"}
VARIANTS = {"4bit": [("fp32", ["--load_in_4bit", "false"]), ("4-bit NF4", ["--load_in_4bit", "true"])],
            "cpu_dtype": [("float32", ["--cpu_dtype", "float32"]), ("bfloat16", ["--cpu_dtype", "bfloat16"]),
                          ("bfloat16, no TIS", ["--cpu_dtype", "bfloat16", "--sampler_correction", "none"])]}

CHILD = r"""
import json, resource, sys
sys.argv = ["train.py"] + json.loads(sys.argv[1])
import train
code = train.main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def run_variant(name: str, flags: list[str], config: str, settings: list[str], steps: int, out: Path) -> dict:
    args = ["--config", config, "--mode", "grpo", "--max_steps", str(steps), "--output_dir", str(out),
            "--save_steps", "0", "--progress_bar", "false", "--eval_steps", "0", "--log_completions_steps", "0"]
    for setting in settings:
        key, value = setting.split("=", 1)
        args += [f"--{key}", value]
    args += flags
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # drop warm-up
    return {
        "variant": name,
        "step_s": statistics.median(m["rollout_s"] + m["update_s"] for m in metrics),
        "rollout_s": statistics.median(m["rollout_s"] for m in metrics),
        "update_s": statistics.median(m["update_s"] for m in metrics),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
        # tokens_per_s counts the step's completion tokens over the whole step: over the rollout alone
        "rollout_tokens_per_s": statistics.median(m["tokens_per_s"] * (m["rollout_s"] + m["update_s"]) / m["rollout_s"]
                                                  for m in metrics),
        "mismatch_kl": statistics.median(m.get("mismatch/kl", float("nan")) for m in metrics),
        "peak_rss_mib": peak_kb / 1024,
        "steps_timed": len(metrics),
    }


def table(rows: list[dict]) -> str:
    lines = ["| variant | step s (median) | rollout s | update s | completion tokens/s (step) | rollout tokens/s "
             "| mismatch/kl | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['rollout_tokens_per_s']:.1f} | {r['mismatch_kl']:.2e} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="4bit", help="which variants to time")
    parser.add_argument("--config", default="configs/demo.yaml", help="the run's config (relative to the repo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant (repeatable)")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per variant (the first is not timed)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in VARIANTS[args.compare]:
            rows.append(run_variant(name, flags, args.config, args.set, args.steps, Path(tmp) / name.replace(" ", "_")))
            print(rows[-1], flush=True)
    out = table(rows)
    print(out)
    if args.write:
        command = "python benchmarks/demo_step.py " + " ".join(sys.argv[1:])
        text = (f"Measured {datetime.date.today()} on {machine()}, with `{command}`: GRPO steps of {args.config}"
                f"{' with ' + ', '.join(args.set) if args.set else ''} (mode grpo, no SFT), median over "
                f"{rows[0]['steps_timed']} steps after a warm-up step.\n\n{out}\n")
        section = SECTIONS[args.compare] + ("" if args.config == "configs/demo.yaml" else f" ({Path(args.config).stem})")
        write_section(section, text)


if __name__ == "__main__":
    main()
