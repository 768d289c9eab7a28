"""Evaluate a model (plus an optional adapter or checkpoint) on GSM8K, or ask it questions.

    python test.py --model embedded --dataset ../shared/data/gsm8k/test.jsonl --limit 20
    python test.py --checkpoint runs/demo --k 1,8 --samples 8 --temperature 0.7
    python test.py --question "Tom has 3 apples and buys 4 more. How many does he have?"
    python test.py --interactive --save_traces traces.jsonl

Evaluation writes OUTPUT/summary.json and OUTPUT/samples.jsonl (see grpo/evaluate.py for
what each number means). Bad input ends with one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="embedded",
                   help="base model: a hub id, a local folder, or 'embedded' (SmolLM2-135M-Instruct, offline)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run the Python code a model repository ships (off: only for a repository you trust)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    src.add_argument("--checkpoint",
                     help="a checkpoint-N folder, or a run folder (its latest checkpoint-N is used)")
    p.add_argument("--dataset", default="synthetic",
                   help="GSM8K source: a hub id, a .jsonl/.json/.parquet file or folder, or synthetic[:N[:SEED]]")
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--format", default="xml", choices=["xml", "hash", "xml3"], help="prompt format")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--k", default="1", help="comma-separated k values for pass@k (each <= --samples, except 1)")
    p.add_argument("--samples", type=int, default=0,
                   help="sampled completions per question for pass@k (0 = greedy pass@1 only)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature: default 1.0 for the pass@k samples, 0 (greedy) for "
                        "--question/--interactive")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold for samples")
    p.add_argument("--batch_size", type=int, default=16, help="completions per sampler call")
    p.add_argument("--max_new_tokens", type=int, default=256, help="completion length limit (tokens)")
    p.add_argument("--max_prompt_length", type=int, default=512, help="prompt length limit (tokens, keeps the end)")
    p.add_argument("--output", default=None,
                   help="results folder (default: runs/eval/<model>-<format>-<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--decode", default=None, choices=["auto", "dynamic", "static", "compiled"],
                   help="decode loop (grpo.staticgen). Default: auto for evaluation (compiled or static on "
                        "CUDA, dynamic on CPU); dynamic for --question/--interactive (no compile wait)")
    p.add_argument("--cpu_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision on CPU: auto = bfloat16 autocast where the CPU has fast bf16 matmuls "
                        "(AVX512-BF16 or AMX), else float32 (grpo/precision.py); ignored on CUDA")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true",
                      help="read questions from stdin, one per line, until EOF or 'exit'")
    mode.add_argument("--question", help="answer this one question and exit")
    p.add_argument("--save_traces", default=None,
                   help="append queries and full reasoning traces (question, completion, answer) to this JSONL file")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Checking the input (before the slow model load)


def parse_k_list(text: str, n_samples: int) -> list[int]:
    """'1,5,10' -> [1, 5, 10]; every k >= 1, and k <= n_samples except k = 1 (greedy)."""
    from grpo.evaluate import check_k_list

    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--k {text!r}: expected comma-separated integers such as 1,5,10") from None
    if n_samples < 0:
        raise ValueError(f"--samples {n_samples}: must be >= 0")
    return check_k_list(ks, n_samples)


def resolve_adapter(adapter: str | None, checkpoint: str | None) -> str | None:
    """The adapter folder to load: --adapter as given; --checkpoint DIR -> DIR itself when
    it holds an adapter, else the latest DIR/checkpoint-N."""
    from grpo.checkpoint import CheckpointError, list_checkpoints

    if adapter is not None:
        if not Path(adapter).is_dir():
            raise CheckpointError(f"--adapter {adapter!r}: no such folder; pass a folder written by save_pretrained "
                                  "(a run's checkpoint-N/ or sft/adapter/), or use --checkpoint RUN_DIR")
        return adapter
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(
            f"--checkpoint {checkpoint!r}: no such folder; pass a checkpoint-N folder or a run folder "
            "that holds checkpoint-N folders"
        )
    if (path / "adapter_config.json").is_file():
        return str(path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"--checkpoint {checkpoint!r} holds neither an adapter (adapter_config.json) nor any "
            "checkpoint-N folder; for an SFT adapter pass --adapter RUN/sft/adapter"
        )
    return str(found[-1])


# ---------------------------------------------------------------------------------------
# Model


def load_model(name: str, adapter: str | None, trust_remote_code: bool = False):
    """(model, tokenizer): the base, with the adapter applied when given, in eval mode."""
    from grpo.model import check_adapter, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_base_model(name, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        check_adapter(adapter, model)
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# Modes


def run_evaluation(args, model, tokenizer, rows, k_list: list[int], adapter: str | None) -> dict:
    from grpo.evaluate import evaluate, write_results

    temperature = 1.0 if args.temperature is None else args.temperature
    start = time.time()
    summary, records = evaluate(
        model, tokenizer, rows, fmt=args.format, k_list=k_list, n_samples=args.samples,
        temperature=temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress, decode=args.decode or "auto",
    )
    meta = {
        "model": args.model, "adapter": adapter, "dataset": args.dataset, "split": args.split,
        "limit": args.limit, "format": args.format, "temperature": temperature, "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
        "batch_size": args.batch_size, "seed": args.seed, "decode": args.decode or "auto",
        "cpu_dtype": args.cpu_dtype, "precision": getattr(args, "precision", None),
        "wall_seconds": round(time.time() - start, 1),
    }
    out = Path(args.output)
    samples_path, summary_path = write_results(out, summary, records, meta)
    if args.save_traces:
        traces = [
            {"index": r["index"], "question": r["question"], "gold": r["gold"], "kind": kind,
             "completion": c["completion"], "answer": c["answer"], "correct": c["correct"]}
            for r in records
            for kind, c in [("greedy", r["greedy"])] + [("sample", s) for s in r["samples"]]
        ]
        append_traces(args.save_traces, traces)
    print(format_summary(summary))
    print(f"wrote {summary_path} and {samples_path}")
    return summary


def default_output(args) -> str:
    name = Path(args.model).name or args.model.replace("/", "_")
    return f"runs/eval/{name}-{args.format}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_summary(summary: dict) -> str:
    keys = [k for k in summary if k.startswith(("pass@", "strict_pass@", "sampled_pass@"))]
    keys += ["format_rate", "mean_completion_tokens", "truncated_rate", "n_questions"]
    return "\n".join(
        f"{k:>24}  {summary[k]:.4f}" if isinstance(summary[k], float) else f"{k:>24}  {summary[k]}"
        for k in keys
    )


def answer(args, model, tokenizer, question: str, generator) -> dict:
    """One completion for `question`, printed as reasoning then final answer."""
    from data import apply_chat_template, build_messages, get_format
    from grpo.evaluate import split_reasoning
    from grpo.rollout import generate_rollout

    temperature = 0.0 if args.temperature is None else args.temperature
    prompt = apply_chat_template(tokenizer, build_messages(question, args.format))
    rollout = generate_rollout(
        model, tokenizer, [prompt], group_size=1, max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p, top_k=0,
        generator=generator, decode=args.decode or "dynamic",
    )
    completion = rollout.completion_texts[0]
    reasoning, final = split_reasoning(completion, args.format)
    truncated = bool(rollout.truncated[0])
    print(f"--- reasoning ---\n{reasoning}\n--- answer ---\n{final if final is not None else '(none found)'}"
          + ("\n(truncated: no end of answer within --max_new_tokens)" if truncated else ""), flush=True)
    return {"question": question, "completion": completion, "reasoning": reasoning, "answer": final,
            "follows_format": get_format(args.format).follows(completion), "truncated": truncated}


def run_interactive(args, model, tokenizer, questions) -> None:
    import torch

    generator = torch.Generator(next(model.parameters()).device).manual_seed(args.seed)
    if args.interactive and sys.stdin.isatty():
        print("Type a question (empty line skips; 'exit' or Ctrl-D quits).", flush=True)
    for question in questions:
        question = question.strip()
        if question.lower() in ("exit", "quit"):
            break
        if not question:
            continue
        trace = answer(args, model, tokenizer, question, generator)
        if args.save_traces:
            append_traces(args.save_traces, [trace])


def stdin_questions():
    """Lines of stdin until EOF (a `> ` prompt when it is a terminal)."""
    while True:
        try:
            yield input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return


def check_outputs(args) -> None:
    """Before any model is loaded: the results folder and the traces file can be written (an
    evaluation that cannot save its results would be lost at the end)."""
    from grpo.faults import check_writable

    if not (args.interactive or args.question is not None):
        args.output = args.output or default_output(args)  # one name: the default holds the time
        check_writable(args.output, "output", "the evaluation's summary.json and samples.jsonl")
    if args.save_traces:
        traces = Path(args.save_traces)
        if traces.is_dir():
            raise ValueError(f"--save_traces {traces} is a folder: give a file, e.g. {traces / 'traces.jsonl'}")
        check_writable(traces.parent, "save_traces", "the traces file")


def append_traces(path: str, traces: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from data import DataError
    from grpo.checkpoint import CheckpointError
    from grpo.model import ModelLoadError
    from grpo.precision import autocast, resolve_cpu_dtype

    args = parse_args(argv)
    try:
        adapter = resolve_adapter(args.adapter, args.checkpoint)
        rows = k_list = None
        if args.question is not None and not args.question.strip():
            raise ValueError("--question is empty: pass the question text, e.g. --question \"What is 6 * 12?\"")
        if not (args.interactive or args.question is not None):
            from data import load_gsm8k

            k_list = parse_k_list(args.k, args.samples)
            if args.limit is not None and args.limit < 1:
                raise ValueError(f"--limit {args.limit}: must be >= 1")
            rows = load_gsm8k(args.dataset, args.split, limit=args.limit)
        check_outputs(args)
        model, tokenizer = load_model(args.model, adapter, trust_remote_code=args.trust_remote_code)
        dtype, why = resolve_cpu_dtype(args.cpu_dtype, next(model.parameters()).device)
        if dtype is not None:
            args.precision = str(dtype).removeprefix("torch.")  # recorded in summary.json
            print(f"precision: {args.precision} on CPU ({why})", file=sys.stderr)
        with autocast(dtype):
            if args.question is not None:
                run_interactive(args, model, tokenizer, [args.question])
            elif args.interactive:
                run_interactive(args, model, tokenizer, stdin_questions())
            else:
                run_evaluation(args, model, tokenizer, rows, k_list, adapter)
    except (ModelLoadError, CheckpointError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
