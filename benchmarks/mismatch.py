"""Sampler / learner mismatch on the embedded model: how far the distribution the rollout is
drawn from lies from the one the loss uses, per sampler.

    python benchmarks/mismatch.py [--prompts 8] [--generations 4] [--max_new_tokens 128] [--write]

SmolLM2-135M-Instruct (embedded), the first `--prompts` GSM8K train questions in the xml
format, G completions each at temperature 1, sampled by the trainer's own rollout
(`Trainer.generate`, which records the sampler's log-probs). The learner's log-probs of the
same tokens come from the PEFT model as the update computes them (`Trainer.logprobs`).
Metrics (`grpo.losses.mismatch_sums`, over every completion token): k3 of the sampler
against the learner (KL(sampler || learner)), mean |log-prob difference|, the largest ratio
pi_learner / pi_sampler, and the fraction of tokens whose TIS weight the cap C = 2 truncates.
The adapter is freshly initialized (LoRA B = 0), so both hold the base's weights: what is
measured is numerics, not training drift.

Samplers:
- fast fp32: the merged dense copy in float32 (the CPU default), learner PEFT on a float32 base;
- fast bf16: the copy in bfloat16 (CUDA's default; `cpu_dtype` would bring it to CPU);
- PEFT fp32: the PEFT model samples itself (fast_rollout false): incremental vs one-pass forward;
- 4-bit fast fp32: an NF4 base; the copy dequantized to float32, learner the PEFT model on the
  4-bit base (bitsandbytes' float32 dequantize path, which the library forces on CPU);
- 4-bit bitsandbytes bf16 kernel: on CPUs with AVX512-BF16 only: the PEFT model on the 4-bit base
  samples in eval mode with bitsandbytes' own CPU choice left on (it packs the weights and
  runs a bf16 kernel), against the float32 learner: why the library turns that choice off.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from common import machine, write_section  # benchmarks/common.py (the script's folder)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Sampler / learner mismatch (CPU, embedded model)"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def trainer(rows, args, **overrides):
    import grpo

    cfg = grpo.GRPOConfig(output_dir="/tmp/mismatch-bench", num_generations=args.generations,
                          batch_size=args.prompts * args.generations, micro_batch_size=args.generations,
                          max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0,
                          progress_bar=False, seed=0, **overrides)
    return grpo.Trainer("embedded", None, ["correctness"], rows, cfg)


def measure(sampler_trainer, learner_trainer, args) -> dict:
    """Sample with `sampler_trainer`'s sampler, score with `learner_trainer`'s PEFT model."""
    from grpo.losses import mismatch_sums

    rows, seeds = sampler_trainer.draw(args.prompts)
    t0 = time.perf_counter()
    rollout = sampler_trainer.generate(rows, seeds)
    t1 = time.perf_counter()
    parts = []
    with torch.no_grad():
        learner_trainer.model.train()
        for mb in learner_trainer.micro_batches(rollout.completion_ids.shape[0]):
            old = learner_trainer.logprobs(rollout, mb)
            parts.append(mismatch_sums(old, rollout.sampler_logp[mb], rollout.completion_mask[mb], cap=2.0))
    tokens = sum(p["tokens"] for p in parts)
    return {"tokens": int(tokens), "kl": sum(p["kl"] for p in parts) / tokens,
            "abs_diff": sum(p["abs_diff"] for p in parts) / tokens,
            "ratio_max": max(p["ratio_max"] for p in parts),
            "truncated": sum(p["truncated"] for p in parts) / tokens, "sample_s": t1 - t0}


def run(args) -> list[tuple[str, dict]]:
    import bitsandbytes.functional as bnbf

    from data import load_gsm8k, make_prompt_rows
    from grpo.fastgen import FastPolicy

    rows = make_prompt_rows(load_gsm8k(str(GSM8K), limit=args.prompts), "xml")
    out = []
    full = trainer(rows, args, load_in_4bit=False)
    out.append(("fast fp32 / PEFT fp32", measure(full, full, args)))
    full.state.prompts_drawn = full.state.data_index = 0  # the same prompts and seeds for each sampler
    full.fast_policy = FastPolicy(full.model, dtype=torch.bfloat16)
    out.append(("fast bf16 / PEFT fp32", measure(full, full, args)))
    full.state.prompts_drawn = full.state.data_index = 0
    full.fast_policy = None
    out.append(("PEFT fp32 / PEFT fp32", measure(full, full, args)))
    del full
    quant = trainer(rows, args, load_in_4bit=True)
    out.append(("4-bit: fast fp32 / PEFT 4-bit fp32", measure(quant, quant, args)))
    if bnbf.has_avx512bf16():
        import bitsandbytes as bnb

        packed = trainer(rows, args, load_in_4bit=True, fast_rollout=False)
        for m in packed.model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True  # bitsandbytes' own choice on this CPU
        quant.state.prompts_drawn = quant.state.data_index = 0
        out.append(("4-bit: bitsandbytes bf16 kernel / PEFT 4-bit fp32", measure(packed, quant, args)))
    return out


def table(results: list[tuple[str, dict]]) -> str:
    lines = ["| sampler / learner | tokens | mismatch/kl | mean abs log-prob diff | ratio max | truncated at C=2 | sampling s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results:
        lines.append(f"| {name} | {r['tokens']} | {r['kl']:.2e} | {r['abs_diff']:.2e} | {r['ratio_max']:.4f} | "
                     f"{r['truncated']:.4f} | {r['sample_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help=f"write the table to RESULTS.md ({SECTION!r})")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    text = table(results)
    print(text)
    if args.write:
        cmd = "python benchmarks/mismatch.py " + " ".join(sys.argv[1:])
        write_section(SECTION, f"{datetime.date.today()}, {machine()}. Command: `{cmd}`.\n"
                      f"SmolLM2-135M-Instruct, the first {args.prompts} GSM8K train questions (xml format), "
                      f"G {args.generations}, temperature 1, up to {args.max_new_tokens} new tokens; a fresh "
                      "adapter (LoRA B = 0), so sampler and learner hold the same weights. mismatch/kl is k3 of "
                      "the sampler against the learner over every completion token (grpo.losses.mismatch_sums).\n\n"
                      + text)


if __name__ == "__main__":
    main()
