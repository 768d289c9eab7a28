"""Rollout throughput: our sampler (through the PEFT model, and through the merged fast
copy of `grpo.fastgen.FastPolicy`) vs HF `model.generate` on the same PEFT policy.

    python benchmarks/rollout.py --quick            # one small shape, fp32 only
    python benchmarks/rollout.py                    # CPU: embedded SmolLM2-135M, fp32 and 4-bit + LoRA
    python benchmarks/rollout.py --write            # ... and replace our section of RESULTS.md
    python benchmarks/rollout.py --precisions 4bit --batch 32 --new-tokens 128

Every method generates exactly `--new-tokens` tokens per row (ours: `ignore_eos=True`;
HF: `min_new_tokens = max_new_tokens`), sampled at temperature 1 with top-k and top-p off,
from the same left-padded chat-templated GSM8K prompts (P = batch / G prompts, each
repeated G times). The LoRA (r 16, alpha 32, all 7 projections) gets random nonzero B,
as after training. Methods run interleaved (A, B, C, A, B, C, ...) after one untimed
warm-up round, so that load from other processes on a shared machine hits them alike; the
table gives medians. `fast` times sampling only; the one-off build and the per-step
`refresh()` (the merge after an optimizer step) are timed apart.

On CUDA the defaults become the issue's GPU shape: a Qwen3-0.6B config with random
weights, 4-bit NF4 + LoRA, G 8, batch 64, 256 new tokens (random prompt ids, 128 long).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import load_average, machine, write_section  # benchmarks/common.py (the script's folder)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Rollout throughput (CPU)"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
METHODS = ("hf_generate", "ours_peft", "ours_fast")
# method -> (sample from the fast copy?, decode loop); hf_generate is apart
OURS = {"ours_peft": (False, "dynamic"), "ours_fast": (True, "dynamic"),
        "ours_fast_static": (True, "static"), "ours_fast_compiled": (True, "compiled")}
DECODE_LOOPS = ("ours_fast", "ours_fast_static", "ours_fast_compiled")
DECODE_SECTION = "## Decode loops (CPU)"


# ---------------------------------------------------------------- shared with benchmarks/step.py
def gsm8k_prompts(tokenizer, n: int, fmt: str = "xml") -> list[dict]:
    """n GSM8K test rows as chat prompt rows (messages + answer); synthetic ones if the
    shared data is absent."""
    import json

    from data import make_prompt_rows

    if GSM8K.is_file():
        lines = GSM8K.read_text().splitlines()[:n]
        rows = [{"question": r["question"], "answer": r["answer"].split("####")[-1].strip()}
                for r in map(json.loads, lines)]
    else:
        from data.synthetic import generate_problems

        rows = [{"question": p["question"], "answer": p["answer"]} for p in generate_problems(n, seed=0)]
    return make_prompt_rows(rows, fmt)


def policy(model_name: str, load_in_4bit: bool, device: torch.device, lora_std: float = 1e-3):
    """The embedded (or given) base, 4-bit or not, with our LoRA (r 16, alpha 32, all
    projections); B is drawn N(0, lora_std) so that the adapter is not a no-op."""
    from grpo.config import GRPOConfig
    from grpo.model import attach_adapters, load_base_model

    base = load_base_model(model_name, load_in_4bit=load_in_4bit, device=device)
    model = attach_adapters(base, GRPOConfig(lora_dropout=0.05))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * lora_std)
    return model


# ---------------------------------------------------------------- this benchmark
def gpu_random_qwen3(tmp: str) -> str:
    """A Qwen3-0.6B-shaped model with random weights, saved to `tmp` (no hub access)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        tie_word_embeddings=True, rope_theta=1_000_000, eos_token_id=151645, pad_token_id=151643,
    )
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
    return tmp


def prompt_batch(args, tokenizer, device):
    """[P, Tp] left-padded ids and mask of the P distinct prompts."""
    from grpo.rollout import encode_prompts
    from data import apply_chat_template

    P = args.batch // args.group
    if tokenizer is None:  # GPU shape: random ids
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 151000, (P, args.prompt_len), generator=g)
        mask = torch.ones_like(ids)
    else:
        texts = [apply_chat_template(tokenizer, r["prompt"]) for r in gsm8k_prompts(tokenizer, P)]
        ids, mask, _ = encode_prompts(tokenizer, texts, None)
    return ids.to(device), mask.to(device)


def run_precision(args, precision: str, device: torch.device) -> list[dict]:
    from grpo.fastgen import FastPolicy
    from grpo.model import load_tokenizer
    from grpo.rollout import sample

    if device.type == "cuda":
        tokenizer, name = None, gpu_random_qwen3(tempfile.mkdtemp())
        pad_id = 151643
    else:
        tokenizer, name = load_tokenizer(args.model), args.model
        pad_id = tokenizer.pad_token_id
    model = policy(name, precision == "4bit", device)
    uniq_ids, uniq_mask = prompt_batch(args, tokenizer, device)  # [P, Tp]: ours prefill each prompt once
    ids, mask = (x.repeat_interleave(args.group, 0) for x in (uniq_ids, uniq_mask))  # [B, Tp]: HF's input
    B, N = ids.shape[0], args.new_tokens

    t = time.perf_counter()
    fast = FastPolicy(model)
    fast.refresh()
    build_s = time.perf_counter() - t
    refresh_s = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def hf_generate():
        torch.manual_seed(0)
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=pad_id)

    def ours(m, decode):
        def run():
            g = torch.Generator(device).manual_seed(0)
            return sample(m, uniq_ids, uniq_mask, group_size=args.group, max_new_tokens=N, eos_token_ids=[],
                          pad_token_id=pad_id, temperature=1.0, generator=g, ignore_eos=True,
                          decode=decode, bucket=args.bucket)
        return run

    def fast_refresh():
        t0 = time.perf_counter()
        fast.refresh()
        sync()
        refresh_s.append(time.perf_counter() - t0)

    calls = {"hf_generate": hf_generate}
    calls |= {m: ours(fast.model if on_fast else model, decode) for m, (on_fast, decode) in OURS.items()}
    model.eval()
    times = {m: [] for m in args.methods}
    first_s = {}  # seconds of each method's first call (compiles, for ours_fast_compiled)
    for rep in range(1 - args.warmup, args.repeats + 1):  # round 0 = warm-up
        for m in args.methods:
            if m in OURS and OURS[m][0]:  # sampled from the fast copy: merge the LoRA first
                fast_refresh()
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = calls[m]()
            sync()
            dt = time.perf_counter() - t0
            produced = (out.shape[1] - ids.shape[1]) if m == "hf_generate" else out[0].shape[1]
            if produced != N:
                raise RuntimeError(f"{m} produced {produced} tokens per row, expected {N}")
            first_s.setdefault(m, dt)
            if rep:
                times[m].append(dt)
            print(f"  {precision} {m} round {rep}: {dt:.2f} s ({B * N / dt:.0f} tok/s)", flush=True)
    ref = statistics.median(times[args.reference]) if args.reference in times else None
    notes = {"ours_fast": f"build {build_s:.2f} s once; refresh {statistics.median(refresh_s) * 1e3:.0f} ms/step",
             "ours_fast_compiled": f"first call (compiles) {first_s.get('ours_fast_compiled', 0):.1f} s"}
    rows = []
    for m in args.methods:
        s = statistics.median(times[m])
        rows.append({"precision": precision, "method": m, "median_s": s, "tok_s": B * N / s,
                     "vs_ref": (ref / s) if ref else None, "runs": len(times[m]), "note": notes.get(m, "")})
    return rows


def format_rows(rows, reference: str) -> list[str]:
    out = [f"| base | method | median s | tokens/s | x {reference} | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        vs = f"{r['vs_ref']:.2f}" if r["vs_ref"] else "-"
        out.append(f"| {r['precision']} | {r['method']} | {r['median_s']:.2f} | {r['tok_s']:.0f} | {vs} | {r['note']} |")
    return out


def main(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="G 4, batch 8, 16 tokens, fp32, 1 repeat")
    p.add_argument("--model", default="embedded", help="CPU: hub id / dir / embedded")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["4bit"] if on_gpu else ["fp32", "4bit"])
    p.add_argument("--methods", type=lambda s: s.split(","),
                   default=list(METHODS) + (["ours_fast_compiled"] if on_gpu else []),
                   help=f"comma list of hf_generate, {', '.join(OURS)}")
    p.add_argument("--decode_loops", action="store_true",
                   help=f"compare our decode loops on the fast copy ({', '.join(DECODE_LOOPS)}); "
                        f"--write goes to {DECODE_SECTION!r}")
    p.add_argument("--bucket", type=int, default=64, help="length bucket of the static/compiled loops")
    p.add_argument("--group", type=int, default=8, help="G")
    p.add_argument("--batch", type=int, default=64 if on_gpu else 16, help="completions per rollout")
    p.add_argument("--new-tokens", type=int, default=256 if on_gpu else 64)
    p.add_argument("--prompt-len", type=int, default=128, help="GPU random prompts only")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--warmup", type=int, choices=(0, 1), default=1, help="1: one untimed round first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 OpenMP threads spin at barriers and "
                        "every kernel ran 20-50x slower)")
    p.add_argument("--write", action="store_true", help=f"replace the {SECTION!r} section of RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.group, args.batch, args.new_tokens, args.repeats, args.precisions = 4, 8, 16, 1, ["fp32"]
    args.reference = "hf_generate"
    if args.decode_loops:
        args.methods, args.reference = list(DECODE_LOOPS), "ours_fast"
    unknown = [m for m in args.methods if m != "hf_generate" and m not in OURS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from hf_generate, {', '.join(OURS)}")
    if args.write and on_gpu:
        p.error("--write records the CPU table; paste GPU figures by hand with their command")
    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"{machine()}; {load_average()}; G {args.group}, batch {args.batch}, {args.new_tokens} new tokens")
    rows = []
    for precision in args.precisions:
        rows += run_precision(args, precision, device)
    table = format_rows(rows, args.reference)
    print("\n".join(table))
    cmd = "python benchmarks/rollout.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.write and args.decode_loops:
        write_decode_section(args, table, cmd)
    elif args.write:
        write_section(SECTION, "\n".join([
            f"Measured {datetime.date.today().isoformat()} on {machine()}; {load_average()} at the end "
            "(a load above the benchmark's own threads means other jobs shared the cores); methods "
            "ran interleaved and the table gives medians.",
            f"Command: `{cmd}`",
            "",
            f"Model: embedded SmolLM2-135M-Instruct + LoRA r 16 (alpha 32, all 7 projections, random "
            f"nonzero B). G {args.group}, batch {args.batch} (P {args.batch // args.group} GSM8K test "
            f"prompts), exactly {args.new_tokens} new tokens per row, temperature 1, top-k/top-p off; "
            f"median of {args.repeats} timed rounds{' after a warm-up round' if args.warmup else ''}, "
            f"torch threads {args.threads}. `hf_generate` = "
            "`PeftModel.generate` (what TRL does without vLLM); `ours_peft` = `grpo.rollout.sample` on "
            "the PeftModel; both of ours prefill each distinct prompt once and repeat its KV cache G times "
            "(`sample(..., group_size=G)`), HF prefills all B rows; `ours_fast` = `grpo.rollout.sample` on `grpo.fastgen.FastPolicy` (float32, "
            "LoRA merged into the dequantized base).",
            "",
            *table,
            "",
            "GPU tables were not measured: no GPU was lent to this session. The GPU shape (Qwen3-0.6B "
            "config with random weights, 4-bit + LoRA, G 8, batch 64, 256 new tokens) is the script's "
            "default on CUDA.",
        ]))


def write_decode_section(args, table: list[str], cmd: str) -> None:
    write_section(DECODE_SECTION, "\n".join([
        f"Measured {datetime.date.today().isoformat()} on {machine()}; {load_average()} at the end; methods ran "
        "interleaved and the table gives medians.",
        f"Command: `{cmd}`",
        "",
        f"The three decode loops of `grpo.rollout.sample` on the same fast copy (embedded SmolLM2-135M-Instruct, "
        f"LoRA merged, float32): `ours_fast` = the dynamic loop (growing KV cache, finished rows dropped); "
        f"`ours_fast_static` = `grpo.staticgen` (static KV cache, fixed batch, lengths bucketed to "
        f"{args.bucket}); `ours_fast_compiled` = the same with the one-token step under `torch.compile` "
        f"(inductor; mode reduce-overhead, which means CUDA graphs on a GPU and nothing more on CPU). G "
        f"{args.group}, batch {args.batch}, exactly {args.new_tokens} new tokens per row, temperature 1; median "
        f"of {args.repeats} timed rounds after a warm-up round (which holds the compile), torch threads "
        f"{args.threads}.",
        "",
        *table,
        "",
        "Every row here runs to the length limit, so the dynamic loop's one advantage, dropping finished "
        "rows, does not show; in real rollouts rows stop apart and the static loop keeps computing the "
        "finished ones. On CPU neither fixed-shape loop is worth that (compiling costs a minute and the step "
        "does not get faster), so `rollout_decode: auto` keeps the dynamic loop there. The static and "
        "compiled loops are built for CUDA, where a small model's decode step is bound by kernel launches; "
        "no GPU was lent to the session that wrote them, so their GPU speed is not measured "
        "(`python benchmarks/rollout.py` on a CUDA machine includes `ours_fast_compiled` by default).",
    ]))


if __name__ == "__main__":
    main()
