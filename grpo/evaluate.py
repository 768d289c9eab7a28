"""Evaluation on GSM8K-style rows: pass@1 (greedy), pass@k (sampled), per-question records.

    summary, records = evaluate(model, tokenizer, rows, fmt="xml", k_list=(1, 8), n_samples=8)
    write_results("runs/x/eval", summary, records, meta={"model": "embedded", ...})

Every completion comes from `grpo.rollout.generate_rollout`, the sampler the trainer uses
(one sampler: what is evaluated is what is trained). Greedy is `temperature=0`.

What is counted (the choices, stated once):
- `pass@1`: the fraction of questions whose ONE greedy completion is correct. Correct
  means the answer found by the lenient auto extractor (`data.answers.extract_number`
  with no format: the last `<answer>` block, else the last `#### N` line, else the last
  `\\boxed{}`, else the last number in the text) equals the gold (`numbers_match`): the
  rule of the `correctness` reward, so eval and training reward agree.
- `strict_pass@1`: the same, but the answer is read only by the prompt format's own
  parser (`PromptFormat.parse`): a completion that ignored the layout scores 0.
- `format_rate`: the fraction of greedy completions that follow the format exactly
  (`PromptFormat.follows`).
- `pass@k` for each k > 1 asked: the unbiased estimator of Chen et al. (2021) over
  `n_samples` sampled completions per question, averaged over questions. k = 1 over the
  samples is reported as `sampled_pass@1` (the mean sampled accuracy), so that `pass@1`
  always means greedy.
- `mean_completion_tokens`, `truncated_rate`: over the greedy completions (tokens
  include the stopping EOS; truncated = no EOS within `max_new_tokens`). The same over
  the samples are `sampled_mean_completion_tokens`, `sampled_truncated_rate`.

Reproducibility: one `torch.Generator` on the model's device, seeded with `seed`, draws
every sample in order, so the same (seed, rows, batch_size, n_samples) gives the same
completions. Greedy completions do not depend on the seed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from data import apply_chat_template, build_messages, extract_answer, get_format, numbers_match, parse_number
from data.answers import last_tag_block
from grpo.rollout import generate_rollout

__all__ = [
    "pass_at_k",
    "score_completion",
    "split_reasoning",
    "evaluate",
    "summarize",
    "write_results",
]


# ---------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1, in their
    numerically stable product form: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    Example: n=5, c=2, k=2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {v!r}")
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}; need k <= n")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct out of n={n} samples; need 0 <= c <= n")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---------------------------------------------------------------------------------------
# Scoring one completion (pure string functions)


def _gold_value(gold: Any) -> float | None:
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return float(gold)
    return parse_number(str(gold))


def score_completion(text: str, gold: Any, fmt: str = "xml") -> dict[str, Any]:
    """How one completion scores against the gold answer.

    Returns {"answer": the auto-extracted answer span (str or None), "correct": bool
    (auto extraction, the rule of the correctness reward), "strict_correct": bool (the
    format's own parser), "follows_format": bool}.

    Example (fmt "xml", gold "72"): "<reasoning>\\n6*12=72\\n</reasoning>\\n<answer>\\n72\\n</answer>"
    -> answer "72", correct, strict_correct, follows_format all True; "So it is 72." ->
    answer "72", correct True, strict_correct False, follows_format False.
    """
    pf = get_format(fmt)
    g = _gold_value(gold)
    answer = extract_answer(text)
    return {
        "answer": answer,
        "correct": numbers_match(parse_number(answer), g),
        "strict_correct": numbers_match(pf.parse(text), g),
        "follows_format": pf.follows(text),
    }


def split_reasoning(text: str, fmt: str = "xml") -> tuple[str, str | None]:
    """(reasoning, final answer) of a completion, for display.

    The reasoning is the last `<reasoning>` block when there is one, else the text before
    the answer marker (`<answer>` or the last `####`), else the whole text. The answer is
    the auto-extracted span (None when the text holds no number).
    Example: "Half of 8 is 4.\\n#### 4" -> ("Half of 8 is 4.", "4").
    """
    get_format(fmt)  # validates the name
    answer = extract_answer(text)
    block = last_tag_block(text, "reasoning")
    if block is not None:
        return block.strip(), answer
    lowered = text.lower()
    cut = lowered.rfind("<answer>")
    if cut < 0:
        cut = text.rfind("####")
    return (text[:cut] if cut >= 0 else text).strip(), answer


# ---------------------------------------------------------------------------------------
# The evaluation loop


def evaluate(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    fmt: str = "xml",
    k_list: Sequence[int] = (1,),
    n_samples: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    max_prompt_length: int | None = 512,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    decode: str = "auto",
    bucket: int = 64,
) -> tuple[dict, list[dict]]:
    """Greedy pass@1 and, with `n_samples > 0`, sampled pass@k on `rows`.

    rows: dicts with "question" and "answer" (the gold, e.g. "72"), as `data.load_gsm8k`
    gives. `batch_size` is the number of completions per sampler call (greedy: questions
    per call; sampled: max(1, batch_size // n_samples) questions per call).
    `temperature`/`top_p` apply to the samples only. `decode`/`bucket`: the decode loop
    (`grpo.rollout.sample`); sampled completions are reproducible for a given loop.

    Returns (summary, records): summary as in the module docstring (plus "n_questions",
    "n_samples", "k_list"); one record per question:
    {"index", "question", "gold", "greedy": completion, "samples": [completion, ...],
     "n_correct": correct samples, "pass@k": {k: estimate}}, each completion being
    {"completion", "answer", "correct", "strict_correct", "follows_format", "tokens", "truncated"}.
    """
    k_list = _check_eval_args(rows, fmt, k_list, n_samples, batch_size)
    prompts = [_prompt_text(tokenizer, row, fmt, i) for i, row in enumerate(rows)]
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    common = dict(max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, top_k=0,
                  decode=decode, bucket=bucket)

    bar = _progress_bar(len(rows) * (1 + n_samples), progress)
    greedy = _generate(model, tokenizer, prompts, 1, batch_size, bar,
                       temperature=0.0, top_p=1.0, generator=None, **common)
    samples: list[list[dict]] = [[] for _ in rows]
    if n_samples > 0:
        sampled = _generate(model, tokenizer, prompts, n_samples, batch_size, bar,
                            temperature=temperature, top_p=top_p, generator=generator, **common)
        samples = [sampled[i * n_samples : (i + 1) * n_samples] for i in range(len(rows))]
    if bar is not None:
        bar.close()

    records = []
    for i, row in enumerate(rows):
        g = greedy[i] | score_completion(greedy[i]["completion"], row["answer"], fmt)
        s = [c | score_completion(c["completion"], row["answer"], fmt) for c in samples[i]]
        c = sum(x["correct"] for x in s)
        records.append({
            "index": i,
            "question": row["question"],
            "gold": row["answer"],
            "greedy": g,
            "samples": s,
            "n_correct": c,
            "pass@k": {str(k): pass_at_k(n_samples, c, k) for k in k_list if n_samples},
        })
    return summarize(records, k_list, n_samples), records


def summarize(records: Sequence[dict], k_list: Sequence[int], n_samples: int) -> dict[str, Any]:
    """The summary of per-question records (see the module docstring for each key)."""
    n = len(records)
    greedy = [r["greedy"] for r in records]
    summary: dict[str, Any] = {
        "pass@1": _mean(g["correct"] for g in greedy),
        "strict_pass@1": _mean(g["strict_correct"] for g in greedy),
        "format_rate": _mean(g["follows_format"] for g in greedy),
        "n_questions": n,
        "mean_completion_tokens": _mean(g["tokens"] for g in greedy),
        "truncated_rate": _mean(g["truncated"] for g in greedy),
        "n_samples": n_samples,
        "k_list": list(k_list),
    }
    if n_samples:
        for k in k_list:
            key = "sampled_pass@1" if k == 1 else f"pass@{k}"
            summary[key] = _mean(r["pass@k"][str(k)] for r in records)
        flat = [s for r in records for s in r["samples"]]
        summary["sampled_mean_completion_tokens"] = _mean(s["tokens"] for s in flat)
        summary["sampled_truncated_rate"] = _mean(s["truncated"] for s in flat)
    return summary


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _check_eval_args(rows, fmt, k_list, n_samples, batch_size) -> list[int]:
    get_format(fmt)
    if not rows:
        raise ValueError("evaluate: rows is empty; need at least one question")
    for i, row in enumerate(rows):
        missing = [c for c in ("question", "answer") if c not in row]
        if missing:
            raise ValueError(
                f"evaluate: row {i} has no {missing[0]!r} column (columns: {sorted(row)}); "
                "rows need 'question' and 'answer' (as data.load_gsm8k gives)"
            )
    if n_samples < 0:
        raise ValueError(f"evaluate: n_samples must be >= 0, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    return check_k_list(k_list, n_samples)


def check_k_list(k_list: Sequence[int], n_samples: int) -> list[int]:
    """Sorted distinct ks; each >= 1 and <= n_samples (k = 1 alone is greedy, needs no samples)."""
    k_list = sorted({int(k) for k in k_list})
    if not k_list or any(k < 1 for k in k_list):
        raise ValueError(f"evaluate: every k must be an integer >= 1, got k_list={list(k_list)}")
    too_big = [k for k in k_list if k > max(n_samples, 1)]
    if too_big:
        raise ValueError(
            f"evaluate: pass@{too_big[0]} needs at least {too_big[0]} samples per question (k > n), "
            f"but n_samples={n_samples}; raise n_samples (--samples) to >= {max(k_list)} or drop k={too_big[0]}"
        )
    return k_list


def _prompt_text(tokenizer, row: dict, fmt: str, index: int) -> str:
    try:
        return apply_chat_template(tokenizer, build_messages(row["question"], fmt))
    except ValueError as err:
        raise ValueError(f"evaluate: row {index}: {err}") from None


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="completion", dynamic_ncols=True)


def _generate(model, tokenizer, prompts: list[str], group_size: int, batch_size: int, bar,
              **sampling) -> list[dict]:
    """group_size completions per prompt, max(1, batch_size // group_size) prompts per
    sampler call; returns len(prompts) * group_size dicts in prompt order."""
    per_call = max(1, batch_size // group_size)
    out = []
    for start in range(0, len(prompts), per_call):
        rollout = generate_rollout(model, tokenizer, prompts[start : start + per_call],
                                   group_size=group_size, **sampling)
        lengths = rollout.completion_lengths.tolist()
        truncated = rollout.truncated.tolist()
        for text, n, cut in zip(rollout.completion_texts, lengths, truncated):
            out.append({"completion": text, "tokens": int(n), "truncated": bool(cut)})
        if bar is not None:
            bar.update(len(rollout.completion_texts))
    return out


# ---------------------------------------------------------------------------------------
# Results on disk


def write_results(out_dir: str | Path, summary: dict, records: Sequence[dict],
                  meta: dict | None = None) -> tuple[Path, Path]:
    """Write `DIR/samples.jsonl` (one line per question) and `DIR/summary.json`
    (`summary` plus `meta`: model, adapter, dataset and settings, as the caller gives).

    Each file is written to a temporary name and renamed, so a crash never leaves a
    half file. Returns (samples path, summary path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples_path, summary_path = out / "samples.jsonl", out / "summary.json"
    _write_atomic(samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _write_atomic(summary_path, json.dumps({**summary, **(meta or {})}, indent=2, default=str) + "\n")
    return samples_path, summary_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
