"""One whole GRPO step (rollout + rewards + log-probs + update), ours vs TRL's GRPOTrainer.

    pip install --no-deps --target /tmp/trl_pkg trl     # TRL is never a dependency of ours
    python benchmarks/step.py --trl_path /tmp/trl_pkg [--rounds 2] [--write]

Same model (embedded SmolLM2-135M-Instruct, loaded by `grpo.model.load_base_model` for both),
same LoRA (r 16, alpha 32, dropout 0, all 7 projections), same precision (`--four_bit`),
same G, prompts per step, completion limit, temperature 1, beta 0.04, loss `bnpo`, one
optimizer step per rollout, lr 1e-5, the same activation checkpointing (`--gradient_checkpointing`:
on in both, TRL's default; off in both without it), no vLLM, the same GSM8K test prompts (xml format) and reward functions
(`rewards`: correctness, strict_format, xmlcount; TRL-compatible signature). Completions stop
at EOS or the limit in both, so tokens/s counts the completion tokens each produced.

Each framework runs in a fresh subprocess (so its peak RSS is its own), with glibc's
mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`): every tensor of 64 KiB or more
is its own mapping, returned to the kernel when freed, so RSS follows the live tensors.
With glibc's default (a threshold that grows up to 32 MiB) freed tensors stay in
fragmented heaps and the same command measured peaks 1.5 GB apart. The fixed threshold
costs page faults: steps are slower than under the default (ours with checkpointing: 42 s
against 28-34 s in a separate run), for both frameworks alike. Peak RSS is
the kernel's VmHWM, reset right after the base model is loaded (the same loader for both),
so it covers trainer setup (PEFT wrap, optimizer) and the steps: model, libraries,
activations, our fast copy, 1 warm-up step then `--steps` timed steps; frameworks are
interleaved (ours, TRL, ours, TRL, ...) over `--rounds`, and the table gives medians over
all timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_average, machine, write_section  # noqa: E402
from rollout import gsm8k_prompts  # noqa: E402

SECTION = "## Whole GRPO step vs TRL (CPU, {setting})"  # one section per precision and checkpointing
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the docstring: RSS that follows the live tensors
REWARDS = ("correctness", "strict_format", "xmlcount")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0), so that the peak
    reported is that of the steps, not of loading the checkpoint (which briefly holds it twice)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_ours(args, rows) -> dict:
    import grpo
    from grpo.model import load_base_model, load_tokenizer

    cfg = grpo.GRPOConfig(
        output_dir=tempfile.mkdtemp(), model="embedded", load_in_4bit=args.four_bit,
        num_generations=args.group, batch_size=args.group * args.prompts, micro_batch_size=args.group * args.prompts,
        max_completion_length=args.new_tokens, max_steps=args.steps + 1, learning_rate=1e-5,
        lr_scheduler="constant", beta=0.04, loss_type="bnpo", lora_r=16, lora_alpha=32, lora_dropout=0.0,
        lora_target_modules=TARGETS, temperature=1.0, save_steps=0, progress_bar=False, log_completions_steps=0,
        reward_funcs=list(REWARDS), fast_rollout=args.fast_rollout, fast_rollout_keep=args.keep, seed=0,
        gradient_checkpointing=args.gradient_checkpointing, cpu_dtype=args.cpu_dtype,
    )
    model = load_base_model("embedded", load_in_4bit=args.four_bit)
    tok = load_tokenizer("embedded")
    rss_loaded = _rss_mb()
    _reset_peak()
    trainer = grpo.Trainer(model, tok, None, rows, cfg)
    times, tokens = [], []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        m = trainer.step()
        dt = time.perf_counter() - t0
        print(f"ours step {i}: {dt:.1f} s, mean length {m['completion_length']:.1f}", file=sys.stderr, flush=True)
        if i:
            times.append(dt)
            tokens.append(m["completion_length"] * cfg.batch_size)
    return {"times": times, "tokens": tokens, "rss_loaded_mb": rss_loaded}


def child_trl(args, rows) -> dict:
    sys.path.insert(0, args.trl_path)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    import trl
    from trl import GRPOConfig, GRPOTrainer

    from grpo.model import load_base_model, load_tokenizer
    from rewards import get_reward

    model = load_base_model("embedded", load_in_4bit=args.four_bit)
    tok = load_tokenizer("embedded")
    rss_loaded = _rss_mb()
    _reset_peak()
    batch = args.group * args.prompts
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.new_tokens, max_steps=args.steps + 1,
        learning_rate=1e-5, lr_scheduler_type="constant", beta=0.04, loss_type="bnpo", temperature=1.0,
        gradient_checkpointing=args.gradient_checkpointing, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, use_vllm=False, dataloader_num_workers=0,
    )
    record: dict = {"begin": [], "end": [], "length": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            record["begin"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            record["end"].append(time.perf_counter())
            print(f"trl step {len(record['end']) - 1}: {record['end'][-1] - record['begin'][-1]:.1f} s",
                  file=sys.stderr, flush=True)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                record["length"].append(logs["completions/mean_length"])

    funcs = [get_reward(name) for name in REWARDS]
    trainer = GRPOTrainer(
        model=model, reward_funcs=funcs, args=config, processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
        callbacks=[Timer()],
    )
    trainer.train()
    times = [e - b for b, e in zip(record["begin"], record["end"])][1:]
    tokens = [length * batch for length in record["length"]][1 : len(times) + 1]
    return {"times": times, "tokens": tokens, "rss_loaded_mb": rss_loaded, "version": trl.__version__}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = gsm8k_prompts(None, args.prompts * (args.steps + 1))
    out = child_trl(args, rows) if args.child == "trl" else child_ours(args, rows)
    out["peak_rss_mb"] = _peak_mb()
    print(json.dumps(out))


def run_child(args, framework: str) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--group", str(args.group), "--prompts", str(args.prompts),
           "--new_tokens", str(args.new_tokens), "--steps", str(args.steps), "--threads", str(args.threads),
           "--trl_path", args.trl_path or ""]
    cmd += ["--four_bit"] if args.four_bit else []
    cmd += [] if args.fast_rollout else ["--no_fast_rollout"]
    cmd += [] if args.keep else ["--no_keep"]
    cmd += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--cpu_dtype", args.cpu_dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, **MALLOC_ENV})
    if res.returncode:
        tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-3:]
        return {"error": f"rc={res.returncode}: {' / '.join(tail)[:400]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    times = [t for r in ok for t in r["times"]]
    rates = [n / t for r in ok for n, t in zip(r["tokens"], r["times"])]
    return {"step_s": statistics.median(times), "tok_s": statistics.median(rates), "steps": len(times),
            "peak_mb": max(r["peak_rss_mb"] for r in ok), "loaded_mb": max(r["rss_loaded_mb"] for r in ok),
            "mean_tokens": statistics.mean(n for r in ok for n in r["tokens"]), "version": ok[0].get("version")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl_path", default=os.environ.get("TRL_PATH"), help="folder holding the trl package")
    p.add_argument("--group", type=int, default=4, help="G")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--new_tokens", type=int, default=64, help="max completion tokens")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (ours, TRL) of fresh processes")
    p.add_argument("--four_bit", action="store_true", help="4-bit NF4 base for both")
    p.add_argument("--no_fast_rollout", dest="fast_rollout", action="store_false", help="ours without FastPolicy")
    p.add_argument("--no_keep", dest="keep", action="store_false",
                   help="ours with fast_rollout_keep=False (the fast copy freed during the update)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="activation checkpointing in both (TRL's default; ours is off by default)")
    p.add_argument("--cpu_dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="ours' cpu_dtype (TRL runs in float32 on CPU, bf16 off, as a CPU user of TRL would)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (see benchmarks/rollout.py)")
    p.add_argument("--write", action="store_true", help="replace this precision's section of RESULTS.md")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import torch

    torch.set_num_threads(args.threads)  # so that machine() reports the children's thread count
    frameworks = ["ours"] + (["trl"] if args.trl_path else [])
    runs = {f: [] for f in frameworks}
    for r in range(args.rounds):
        for f in frameworks:
            t0 = time.perf_counter()
            runs[f].append(run_child(args, f))
            print(f"round {r} {f}: {time.perf_counter() - t0:.0f} s {runs[f][-1]}", flush=True)
    res = {f: summarize(v) for f, v in runs.items()}
    lines = ["| framework | median step s | median completion tokens/s | mean tokens/step | peak RSS MB | RSS after load MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for f, s in res.items():
        if "error" in s:
            lines.append(f"| {f} | - | - | - | - | error: {s['error']} |")
        else:
            lines.append(f"| {f} | {s['step_s']:.1f} | {s['tok_s']:.1f} | {s['mean_tokens']:.0f} | {s['peak_mb']:.0f} | {s['loaded_mb']:.0f} |")
    ratio = ""
    if "trl" in res and "error" not in res["trl"] and "error" not in res["ours"]:
        o, t = res["ours"], res["trl"]
        ratio = (f"Ours / TRL: tokens/s x{o['tok_s'] / t['tok_s']:.2f} (goal >= 2), step time x{o['step_s'] / t['step_s']:.2f}, "
                 f"peak RSS x{o['peak_mb'] / t['peak_mb']:.2f} (goal <= 0.6).")
    print("\n".join(lines) + "\n" + ratio)
    if args.write:
        cmd = "python benchmarks/step.py " + " ".join(sys.argv[1:] if argv is None else argv)
        setting = (("4-bit" if args.four_bit else "float32") + (", gradient checkpointing" if args.gradient_checkpointing else "")
                   + ("" if args.cpu_dtype == "float32" else f", ours cpu_dtype {args.cpu_dtype}"))
        trl_version = res.get("trl", {}).get("version") or "?"
        write_section(SECTION.format(setting=setting), "\n".join([
            f"Measured {datetime.date.today().isoformat()} on {machine()}; {load_average()} at the end (a load above "
            "the benchmark's own threads means other jobs shared the cores); frameworks ran interleaved in fresh "
            "processes.",
            f"Command: `{cmd}`",
            "",
            f"Embedded SmolLM2-135M-Instruct, {'4-bit NF4' if args.four_bit else 'float32'} base, LoRA r 16 / alpha 32 / "
            f"all 7 projections, G {args.group}, {args.prompts} GSM8K prompts per step (batch {args.group * args.prompts}), "
            f"<= {args.new_tokens} completion tokens (EOS stops), beta 0.04, loss bnpo, 1 warm-up + {args.steps} timed "
            f"steps x {args.rounds} round(s), torch threads {args.threads}, ours with fast_rollout={args.fast_rollout}, "
            f"fast_rollout_keep={args.keep}, cpu_dtype={args.cpu_dtype}, "
            f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} in both. "
            f"TRL {trl_version}: GRPOTrainer from `pip install --no-deps --target /tmp/trl_pkg trl` (no vLLM, bf16 off). "
            "Peak RSS = whole-process VmHWM, reset after the base model is loaded (trainer setup + steps; includes the "
            "model, libraries, activations and our fast copy), with glibc's mmap threshold fixed at 64 KiB in both "
            "(`MALLOC_MMAP_THRESHOLD_=65536`) so that freed tensors leave the RSS.",
            "",
            *lines,
            "",
            ratio,
            "",
            "GPU tables were not measured: no GPU was lent to this session.",
        ]))


if __name__ == "__main__":
    main()
