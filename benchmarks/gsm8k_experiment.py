"""SmolLM2-135M-Instruct on real GSM8K: baseline, after SFT, after SFT + GRPO (CPU).

    python benchmarks/gsm8k_experiment.py --config configs/smollm2-gsm8k.yaml --write

Stages, each skipped when its output is already there (so the same command continues a
stopped run, chunk by chunk and checkpoint by checkpoint):
  1. baseline  greedy pass@1 + pass@8 of the embedded model on the first N test problems
               (shared with benchmarks/baseline.py: the same folder and settings)
  2. sft       train.py --mode sft with the config (SFT on GSM8K train reasoning chains)
  3. eval-sft  the same evaluation with the SFT adapter
  4. grpo      train.py --mode both with the config: loads the SFT adapter (also the frozen
               KL reference) and runs GRPO with the config's rewards
  5. eval-grpo the same evaluation with the final GRPO adapter
Then the table (95% intervals) goes to RESULTS.md (`--write`) and the learning curves to
benchmarks/plots/smollm2-gsm8k/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import load_average, machine, write_section  # noqa: E402
from benchmarks.gsm8k_eval import bootstrap_interval, evaluate_resumable, interval_text, wilson_interval  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## SmolLM2-135M-Instruct on GSM8K: baseline, SFT, SFT + GRPO (CPU)"
PLOTS = REPO / "benchmarks" / "plots" / "smollm2-gsm8k"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "smollm2-gsm8k.yaml"))
    p.add_argument("--test_data", default=str(REPO.parent / "shared/data/gsm8k/test.jsonl"))
    p.add_argument("--limit", type=int, default=200, help="first N test problems")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7, help="of the pass@k samples")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline_dir", default="runs/baseline", help="shared with benchmarks/baseline.py")
    p.add_argument("--stages", default="baseline,sft,eval-sft,grpo,eval-grpo")
    p.add_argument("--write", action="store_true", help="write the table to RESULTS.md and copy the plots")
    return p.parse_args(argv)


def train_stage(config: str, mode: str, extra: list[str]) -> float:
    """train.py --config CONFIG --mode MODE, resumed when it has checkpoints; wall seconds."""
    import train

    t0 = time.time()
    code = train.main(["--config", config, "--mode", mode, "--resume_from_checkpoint", "latest", *extra])
    if code != 0:
        raise SystemExit(f"train.py --mode {mode} failed with exit code {code}")
    return time.time() - t0


def eval_stage(args, cfg, rows, out: Path, adapter: Path | None) -> dict:
    from grpo.model import load_base_model, load_tokenizer, resolve_model_path

    name = resolve_model_path(cfg.model)
    tokenizer, model = load_tokenizer(name), load_base_model(name, load_in_4bit=False)
    if adapter is not None:
        from peft import PeftModel

        # merged into the float32 base for decoding speed; the same function up to rounding
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    meta = {"model": cfg.model, "adapter": str(adapter) if adapter else None, "dataset": args.test_data,
            "format": cfg.prompt_format, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "seed": 0}
    return evaluate_resumable(
        model, tokenizer, rows, out, fmt=cfg.prompt_format, n_samples=args.samples, k_list=[1, args.samples],
        chunk=args.chunk, meta=meta, temperature=args.temperature, top_p=1.0,
        max_new_tokens=args.max_new_tokens, max_prompt_length=512, batch_size=args.batch_size,
    )


def row(label: str, summary: dict, out: Path, samples: int, steps: str, train_s: float | None) -> str:
    n = summary["n_questions"]
    p1 = interval_text(summary["pass@1"], *wilson_interval(round(summary["pass@1"] * n), n))
    per_q = [json.loads(x)["pass@k"].get(str(samples), 0.0) for x in (out / "samples.jsonl").read_text().splitlines()]
    pk = interval_text(summary[f"pass@{samples}"], *bootstrap_interval(per_q))
    fr = interval_text(summary["format_rate"], *wilson_interval(round(summary["format_rate"] * n), n))
    train = f"{train_s / 60:.0f} min" if train_s else "-"
    return (f"| {label} | {p1} | {pk} | {fr} | {summary['strict_pass@1']:.3f} | {summary['mean_completion_tokens']:.0f} "
            f"| {summary['truncated_rate']:.3f} | {steps} | {train} | {summary['wall_seconds'] / 60:.0f} min |")


def training_seconds(run_dir: Path, key: str) -> float | None:
    """Sum of the per-step times logged in metrics.jsonl (resumes included, evals excluded)."""
    from grpo.metrics import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        return None
    return sum(r.get(key, 0.0) if key != "rollout_s+update_s" else r.get("rollout_s", 0.0) + r.get("update_s", 0.0)
               for r in records)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from data import load_gsm8k
    from grpo.config import parse_config

    cfg = parse_config(["--config", args.config])
    stages = args.stages.split(",")
    run = Path(cfg.output_dir)
    rows = load_gsm8k(args.test_data, split="test", limit=args.limit)
    outs = {"baseline": Path(args.baseline_dir) / cfg.prompt_format, "eval-sft": run.parent / "eval-sft",
            "eval-grpo": run.parent / "eval-grpo"}
    summaries = {}
    if "baseline" in stages:
        summaries["baseline"] = eval_stage(args, cfg, rows, outs["baseline"], None)
    if "sft" in stages:
        train_stage(args.config, "sft", [])
    sft_adapter = run / "sft" / "adapter"
    if "eval-sft" in stages:
        summaries["eval-sft"] = eval_stage(args, cfg, rows, outs["eval-sft"], sft_adapter)
    if "grpo" in stages:
        train_stage(args.config, "both", [])
    final = run / f"checkpoint-{cfg.max_steps}"
    if "eval-grpo" in stages:
        summaries["eval-grpo"] = eval_stage(args, cfg, rows, outs["eval-grpo"], final)
    for name, s in summaries.items():
        print(name, {k: round(s[k], 4) for k in ("pass@1", f"pass@{args.samples}", "format_rate") if k in s}, flush=True)
    if not args.write or len(summaries) < 3:
        return 0

    from grpo.plot import plot_run

    PLOTS.mkdir(parents=True, exist_ok=True)
    for png in plot_run(run):
        shutil.copy(png, PLOTS / png.name)
    sft_s, grpo_s = training_seconds(run / "sft", "step_s"), training_seconds(run, "rollout_s+update_s")
    table = (
        f"| model | pass@1 greedy [95% CI] | pass@{args.samples} [95% CI] | format rate [95% CI] | strict pass@1 "
        "| mean tokens | truncated | steps | training | eval |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + row("baseline (zero-shot)", summaries["baseline"], outs["baseline"], args.samples, "-", None) + "\n"
        + row("after SFT", summaries["eval-sft"], outs["eval-sft"], args.samples, f"{cfg.sft_steps} SFT", sft_s) + "\n"
        + row("after SFT + GRPO", summaries["eval-grpo"], outs["eval-grpo"], args.samples,
              f"{cfg.sft_steps} SFT + {cfg.max_steps} GRPO", (sft_s or 0) + (grpo_s or 0))
    )
    plots = " ".join(f"![{p.stem}](plots/smollm2-gsm8k/{p.name})" for p in sorted(PLOTS.glob("*.png")))
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; {load_average()} when written.\n"
        f"Command: `python benchmarks/gsm8k_experiment.py --config {os.path.relpath(args.config, REPO)} --write` "
        f"(config: SFT {cfg.sft_steps} steps x {cfg.sft_batch_size} chains, lr {cfg.sft_learning_rate}; GRPO "
        f"{cfg.max_steps} steps x {cfg.prompts_per_step} prompts x {cfg.num_generations} completions, lr "
        f"{cfg.learning_rate}, beta {cfg.beta}, rewards {cfg.reward_funcs} weighted {cfg.reward_weights}; "
        f"LoRA r {cfg.lora_r}; format {cfg.prompt_format}).\n"
        f"Evaluation: the first {len(rows)} problems of `../shared/data/gsm8k/test.jsonl`, zero-shot, greedy "
        f"pass@1 and pass@{args.samples} ({args.samples} samples at T {args.temperature}), {args.max_new_tokens} "
        "new tokens, the rules of `test.py` (grpo/evaluate.py). Intervals: 95% Wilson for pass@1 and format "
        "rate, 95% bootstrap over questions for pass@k. Training = the logged step times (rollout + update; "
        "evaluations excluded); eval = the evaluation's own time. Published 5-shot GSM8K of "
        "SmolLM2-135M-Instruct: 1.4%.\n\n" + table + "\n\n" + plots
    )
    write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
