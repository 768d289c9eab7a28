"""How many greedy answers change between two evaluations of the same questions (for example
float32 against bfloat16 on CPU), from the folders `test.py --output DIR` wrote.

    python test.py --model embedded --dataset ../shared/data/gsm8k/test.jsonl --limit 200 \\
        --batch_size 50 --cpu_dtype float32 --output /tmp/eval-float32
    python test.py ... --cpu_dtype bfloat16 --output /tmp/eval-bfloat16
    python benchmarks/compare_evals.py /tmp/eval-float32 /tmp/eval-bfloat16 [--write]

Per question (matched by index): whether the greedy completion text is the same, whether
the extracted answer is the same, and whether each is correct; plus each run's pass@1,
format rate, mean tokens and wall time from its summary.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from common import write_section  # benchmarks/common.py (the script's folder)

SECTION = "## Greedy evaluation, float32 vs bfloat16 on CPU (GSM8K)"


def load(folder: Path) -> tuple[dict, dict[int, dict]]:
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    return summary, {r["index"]: r["greedy"] for r in records}


def compare(a: dict[int, dict], b: dict[int, dict]) -> dict:
    if set(a) != set(b):
        raise SystemExit(f"the two evaluations hold different questions ({len(a)} and {len(b)}): run both on the same rows")
    same_text = sum(a[i]["completion"] == b[i]["completion"] for i in a)
    same_answer = sum(a[i]["answer"] == b[i]["answer"] for i in a)
    flips = sum(a[i]["correct"] != b[i]["correct"] for i in a)
    return {"questions": len(a), "same_text": same_text, "same_answer": same_answer, "correct_flips": flips}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--note", default="", help="a sentence about the runs for RESULTS.md (e.g. other load on the machine)")
    p.add_argument("--write", action="store_true", help=f"write the table to RESULTS.md ({SECTION!r})")
    args = p.parse_args()
    (sa, ra), (sb, rb) = load(args.first), load(args.second)
    c = compare(ra, rb)
    rows = ["| run | precision | pass@1 | format rate | mean tokens | truncated | wall s |", "|---|---|---:|---:|---:|---:|---:|"]
    for folder, s in ((args.first, sa), (args.second, sb)):
        rows.append(f"| {folder.name} | {s.get('precision')} | {s['pass@1']:.3f} | {s['format_rate']:.3f} | "
                    f"{s['mean_completion_tokens']:.1f} | {s['truncated_rate']:.3f} | {s['wall_seconds']:.0f} |")
    text = (f"Of {c['questions']} questions: {c['same_text']} greedy completions identical, "
            f"{c['questions'] - c['same_text']} different; {c['same_answer']} extracted answers the same, "
            f"{c['questions'] - c['same_answer']} changed; correctness flipped on {c['correct_flips']}.")
    print("\n".join(rows) + "\n\n" + text)
    if args.write:
        settings = {k: sa.get(k) for k in ("model", "dataset", "limit", "format", "max_new_tokens", "batch_size")}
        cmd = "python benchmarks/compare_evals.py " + " ".join(sys.argv[1:])
        write_section(SECTION, f"{datetime.date.today()}; the two runs' settings: {settings}; each made by "
                      "`python test.py --model embedded --dataset ../shared/data/gsm8k/test.jsonl --limit 200 "
                      "--batch_size 50 --cpu_dtype D --no_progress --output /tmp/eval-D`, then "
                      f"`{cmd}`. Greedy decoding, so the differences come from the precision alone."
                      + (f" {args.note}" if args.note else "") + "\n\n" + "\n".join(rows) + "\n\n" + text)


if __name__ == "__main__":
    main()
