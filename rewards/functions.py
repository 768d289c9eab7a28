r"""Reward functions: plain functions of strings with the TRL-compatible signature

    fn(prompts, completions, **columns) -> list[float | None]

- `prompts` is unused by the rewards here (it may be None).
- `completions` is a list of strings, or a list of chat-message lists
  (`[{"role": "assistant", "content": "..."}]`), whose last message's content is read.
- `columns` are dataset columns as lists aligned with `completions` (e.g. `answer`, the
  gold as a string such as "72"); unknown ones are ignored.
- One float per completion; None means "not applicable to this sample" (the weighted
  sum in `rewards.compute_rewards` skips it).

Scales (the seeds' conventions): correctness 1.0 / 0.0; format rewards 0.5 / 0.0;
shaping penalties in [-1, 0]. Every docstring carries a worked example that
`python -m rewards` runs (the docstring is the single copy of the example).

The rewards read the decoded text: special tokens that the decoding skipped are not
seen (see DESIGN.md "Notes from experience").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from data.answers import extract_answer, extract_number, last_tag_block, numbers_match, parse_number

RewardFn = Callable[..., list]

__all__ = [
    "completion_text",
    "correctness_reward",
    "int_reward",
    "strict_format_reward",
    "soft_format_reward",
    "xmlcount_reward",
    "hash_format_reward",
    "length_reward",
    "make_length_reward",
    "repetition_reward",
    "make_repetition_reward",
    "reasoning_reward",
    "consistency_reward",
]


# ---------------------------------------------------------------------------- helpers


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; a chat-message list -> the last
    message's "content" (a list of content parts -> their "text" parts joined)."""
    msg = completion
    if isinstance(completion, (list, tuple)):
        if not completion:
            raise ValueError("a chat-message completion is an empty list; expected at least one message")
        msg = completion[-1]
    if isinstance(msg, str):
        return msg
    if isinstance(msg, dict) and "content" in msg:
        content = msg["content"]
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise TypeError(
        "a completion must be a str or a list of chat messages ({'role': ..., 'content': ...}); "
        f"got {type(completion).__name__}: {completion!r:.120}"
    )


def _texts(completions: Sequence[Any]) -> list[str]:
    if isinstance(completions, str):
        raise TypeError("completions must be a list of completions, got a single str")
    return [completion_text(c) for c in completions]


def _column(name: str, values: Sequence[Any] | None, n: int, fn: str) -> Sequence[Any]:
    """A dataset column, checked to be present and aligned with the n completions."""
    if values is None:
        raise ValueError(f"{fn} needs the dataset column {name!r} (one value per completion); it was not given")
    if isinstance(values, str) or len(values) != n:
        got = "a str" if isinstance(values, str) else f"{len(values)} values"
        raise ValueError(f"{fn}: column {name!r} has {got}, expected a list of {n} (one per completion)")
    return values


def _gold_number(gold: Any) -> float | None:
    """A gold answer as a float: a number, "72", "$1,234", or a full GSM8K solution
    ending in "#### 72"; None when it holds no number."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return float(gold)
    if isinstance(gold, str):
        return extract_number(gold)
    raise TypeError(f"a gold answer must be a str or a number, got {type(gold).__name__}: {gold!r:.80}")


def _marked_answer(text: str) -> str | None:
    """The answer span behind an explicit marker (`<answer>` block, else `####` line)."""
    span = extract_answer(text, "xml")
    return span if span is not None else extract_answer(text, "hash")


# ------------------------------------------------------------------------ correctness


def correctness_reward(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    r"""1.0 when the model's answer equals the gold `answer` column, else 0.0.

    The model's answer is found whatever the format (`data.answers.extract_number` in
    auto mode): the last `<answer>` block, else the last `#### N` line, else the last
    `\boxed{}`, else the last number in the text; it is compared with
    `numbers_match` (equal integers, or 1e-4 relative tolerance). The gold may be "72",
    a number, or a full GSM8K solution ending in "#### 72". None when the gold holds
    no number (the sample is not a numeric question).

    Example:
    >>> correctness_reward(None, ["<answer>\n$1,234.50\n</answer>", "... #### 72", "I think 71."],
    ...                    answer=["1234.5", "72", "72"])
    [1.0, 1.0, 0.0]
    >>> correctness_reward(None, [[{"role": "assistant", "content": "So 2/3"}], "x"], answer=["0.6667", "n/a"])
    [1.0, None]
    """
    texts = _texts(completions)
    golds = _column("answer", answer, len(texts), "correctness_reward")
    out: list[float | None] = []
    for text, gold in zip(texts, golds):
        g = _gold_number(gold)
        out.append(None if g is None else float(numbers_match(extract_number(text), g)))
    return out


_INT_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def int_reward(prompts, completions, **kwargs) -> list[float]:
    r"""0.5 when the marked answer (the last `<answer>` block, else the `#### ` line) is a
    bare integer ("72", "-3", "1,234"), else 0.0. No marker -> 0.0 (the last number of
    free text does not count, else any text ending in a digit would earn it).

    Example:
    >>> int_reward(None, ["<answer>\n72\n</answer>", "#### -3", "<answer>72.5</answer>", "<answer>$72</answer>", "so 72"])
    [0.5, 0.5, 0.0, 0.0, 0.0]
    """
    out = []
    for text in _texts(completions):
        span = _marked_answer(text)
        out.append(0.5 if span is not None and _INT_RE.fullmatch(span) else 0.0)
    return out


# ---------------------------------------------------------------------------- format

# A block body that holds no reasoning/answer tag of its own (so that the whole-string
# shape has exactly one block of each).
_BODY = r"((?:(?!</?(?:reasoning|answer)>).)*?)"
_STRICT_RE = re.compile(rf"<reasoning>\n{_BODY}\n</reasoning>\n<answer>\n{_BODY}\n</answer>", re.DOTALL)
_SOFT_JOINT_RE = re.compile(r"</reasoning>\s*<answer>")


def strict_format_reward(prompts, completions, **kwargs) -> list[float]:
    r"""0.5 when the whole completion has exactly the shape
    `<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>` (both bodies non-blank,
    nothing before, only whitespace after), else 0.0.

    Example:
    >>> strict_format_reward(None, ["<reasoning>\n2+2=4\n</reasoning>\n<answer>\n4\n</answer>\n",
    ...                             "<reasoning>2+2=4</reasoning><answer>4</answer>",
    ...                             "<reasoning>\n2+2=4\n</reasoning>\n<answer>\n4\n</answer>\nextra"])
    [0.5, 0.0, 0.0]
    """
    out = []
    for text in _texts(completions):
        m = _STRICT_RE.fullmatch(text.rstrip())
        out.append(0.5 if m and m.group(1).strip() and m.group(2).strip() else 0.0)
    return out


def soft_format_reward(prompts, completions, **kwargs) -> list[float]:
    r"""0.5 when a `<reasoning>...</reasoning>` block is followed (after optional
    whitespace) by an `<answer>...</answer>` block anywhere in the completion, else 0.0.

    Example:
    >>> soft_format_reward(None, ["Sure! <reasoning>2+2=4</reasoning> <answer>4</answer>",
    ...                           "<answer>4</answer><reasoning>2+2=4</reasoning>"])
    [0.5, 0.0]
    """
    return [0.5 if _soft_format(t) else 0.0 for t in _texts(completions)]


def _soft_format(text: str) -> bool:
    r"""`re.search(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", DOTALL)`, in
    linear time: some "</reasoning> <answer>" joint with an opening tag before it and a
    closing tag after it."""
    first_open, last_close = text.find("<reasoning>"), text.rfind("</answer>")
    if first_open < 0 or last_close < 0:
        return False
    return any(
        first_open + len("<reasoning>") <= m.start() and m.end() <= last_close
        for m in _SOFT_JOINT_RE.finditer(text)
    )


_XML_TAGS = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")


def xmlcount_reward(prompts, completions, **kwargs) -> list[float]:
    r"""Partial credit per tag: +0.125 for each of `<reasoning>\n`, `\n</reasoning>\n`,
    `\n<answer>\n`, `\n</answer>` that appears exactly once; minus 0.001 per character
    of non-blank text after the last `</answer>` (the penalty capped at 0.5). Range
    [-0.5, 0.5].

    After the well-known `count_xml` of willccbb's GRPO demo
    (gist.github.com/willccbb/4676755236bb08cab5f4e54a0475d6fb), which departs here:
    the trailing text is penalized once (the demo counts it for both answer tags, and
    gives +0.001 when nothing follows `\n</answer>`), whitespace is not penalized, and
    the penalty is capped.

    Example:
    >>> xmlcount_reward(None, ["<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>\n",
    ...                        "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>\nbye",
    ...                        "<answer>\n7\n</answer>"])
    [0.5, 0.497, 0.125]
    """
    out = []
    for text in _texts(completions):
        score = sum((0.125 for tag in _XML_TAGS if text.count(tag) == 1), 0.0)
        if "</answer>" in text:
            trailing = text.rsplit("</answer>", 1)[1].strip()
            score -= min(0.5, len(trailing) / 1000)
        out.append(score)
    return out


_HASH_END_RE = re.compile(r"(?:\A|\n)[ \t]*####[ \t]*([^\n]*)\Z")  # on rstripped text


def hash_format_reward(prompts, completions, **kwargs) -> list[float]:
    r"""0.5 when the completion's last non-blank line is `#### N` with a number N (the
    GSM8K solution format), else 0.0.

    Example:
    >>> hash_format_reward(None, ["3 + 4 = 7\n#### 7", "#### 7\nDone.", "3 + 4 = 7 #### 7", "#### seven"])
    [0.5, 0.0, 0.0, 0.0]
    """
    out = []
    for text in _texts(completions):
        m = _HASH_END_RE.search(text.rstrip())
        out.append(0.5 if m and parse_number(m.group(1)) is not None else 0.0)
    return out


# --------------------------------------------------------------------------- shaping

DEFAULT_TARGET_CHARS = 1000


def length_reward(
    prompts, completions, *, target_chars: int = DEFAULT_TARGET_CHARS, slack_chars: int | None = None, **kwargs
) -> list[float]:
    r"""Length shaping in [-1, 0]: 0.0 up to `target_chars` characters, then falling
    linearly to -1.0 at `target_chars + slack_chars` (slack defaults to the target), and
    -1.0 beyond. A penalty only: a short or empty completion is not rewarded for it.
    Characters, not tokens, since rewards see text. See `make_length_reward`.

    Example (target 10, slack 10: 15 chars -> -(15 - 10) / 10):
    >>> length_reward(None, ["x" * 5, "x" * 15, "x" * 40], target_chars=10)
    [0.0, -0.5, -1.0]
    """
    slack = target_chars if slack_chars is None else slack_chars
    _check_positive(target_chars=target_chars, slack_chars=slack)
    # "+ 0.0" turns -0.0 into 0.0
    return [-min(1.0, max(0, len(t) - target_chars) / slack) + 0.0 for t in _texts(completions)]


def make_length_reward(target_chars: int = DEFAULT_TARGET_CHARS, slack_chars: int | None = None) -> RewardFn:
    r"""A `length_reward` with its own target, named e.g. `length_reward_200`.

    Example:
    >>> make_length_reward(4)(None, ["abcd", "abcdef"])
    [0.0, -0.5]
    """
    _check_positive(target_chars=target_chars, slack_chars=target_chars if slack_chars is None else slack_chars)

    def fn(prompts, completions, **kwargs):
        return length_reward(prompts, completions, target_chars=target_chars, slack_chars=slack_chars)

    fn.__name__ = fn.__qualname__ = f"length_reward_{target_chars}"
    fn.__doc__ = f"`length_reward` with target_chars={target_chars}, slack_chars={slack_chars}."
    return fn


def repetition_reward(
    prompts, completions, *, ngram_size: int = 3, max_penalty: float = 1.0, **kwargs
) -> list[float]:
    r"""Repetition penalty in [-max_penalty, 0]: -max_penalty * (1 - unique / total) over
    the word n-grams (lower-cased, split on whitespace) of the completion; 0.0 when it
    has fewer than `ngram_size` words. From Yeo et al. 2025, "Demystifying Long
    Chain-of-Thought Reasoning in LLMs" (arXiv:2502.03373), as in open-r1's
    `get_repetition_penalty_reward`.

    Example ("a b a b a": trigrams aba, bab, aba -> 2 unique of 3 -> -(1 - 2/3)):
    >>> [round(r, 4) for r in repetition_reward(None, ["a b a b a", "one two three four", "hi"])]
    [-0.3333, 0.0, 0.0]
    """
    _check_positive(ngram_size=ngram_size, integer=True)
    _check_positive(max_penalty=max_penalty)
    out = []
    for text in _texts(completions):
        words = text.lower().split()
        grams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        frac = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
        out.append(-max_penalty * frac + 0.0)
    return out


def make_repetition_reward(ngram_size: int = 3, max_penalty: float = 1.0) -> RewardFn:
    r"""A `repetition_reward` with its own n-gram size and scale.

    Example (bigrams of "a a a a": aa x3 -> 1 unique of 3 -> -0.5 * (1 - 1/3)):
    >>> [round(r, 4) for r in make_repetition_reward(2, 0.5)(None, ["a a a a"])]
    [-0.3333]
    """
    _check_positive(ngram_size=ngram_size, integer=True)
    _check_positive(max_penalty=max_penalty)

    def fn(prompts, completions, **kwargs):
        return repetition_reward(prompts, completions, ngram_size=ngram_size, max_penalty=max_penalty)

    fn.__name__ = fn.__qualname__ = f"repetition_reward_{ngram_size}"
    fn.__doc__ = f"`repetition_reward` with ngram_size={ngram_size}, max_penalty={max_penalty}."
    return fn


def _check_positive(*, integer: bool = False, **values: float) -> None:
    kind = int if integer else (int, float)
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, kind) or not v > 0:
            raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {v!r}")


# ------------------------------------------------------------------------- reasoning

_STEP_SPLIT_RE = re.compile(r"\n+|(?<=[.!?;])\s+")
_ANSWER_START_RE = re.compile(r"<answer>|####", re.IGNORECASE)


def _reasoning_part(text: str) -> str:
    """The last `<reasoning>` block; else the text before the first answer marker
    (`<answer>` or `####`); else the whole text."""
    block = last_tag_block(text, "reasoning")
    if block is not None:
        return block
    m = _ANSWER_START_RE.search(text)
    return text[: m.start()] if m else text


def reasoning_reward(
    prompts, completions, *, max_steps: int = 5, max_reward: float = 0.5, **kwargs
) -> list[float]:
    r"""Reasoning detail in [0, max_reward]: max_reward * min(k, max_steps) / max_steps,
    where k counts the distinct steps that hold a number. The reasoning is the last
    `<reasoning>` block, else the text before the answer marker, else the whole text; a
    step is a line or a sentence. Distinct, so that repeating a line earns nothing;
    capped, so that padding beyond `max_steps` earns nothing.

    Example (3 distinct numeric steps -> 0.5 * 3 / 5; "Add them." has no number):
    >>> reasoning_reward(None, ["<reasoning>\nHe has 3 apples. She has 4.\nAdd them.\n3 + 4 = 7\n3 + 4 = 7\n</reasoning>\n<answer>7</answer>",
    ...                         "#### 7"])
    [0.3, 0.0]
    """
    _check_positive(max_steps=max_steps, integer=True)
    out = []
    for text in _texts(completions):
        steps = {s.strip() for s in _STEP_SPLIT_RE.split(_reasoning_part(text)) if any(c.isdigit() for c in s)}
        out.append(max_reward * min(len(steps), max_steps) / max_steps)
    return out


# ----------------------------------------------------------------------- consistency



def consistency_reward(prompts, completions, **kwargs) -> list[float | None]:
    r"""Three-part format (`<reasoning>`, `<output>`, `<answer>`): 0.5 when the number in
    the last `<output>` block equals the one in the last `<answer>` block, else 0.0 (also
    when either is missing or unclosed, or holds no number). None when the completion
    has no `<output>` tag at all (the sample is not in the three-part format).

    Example:
    >>> consistency_reward(None, ["<output>\nx = 72.0\n</output>\n<answer>\n72\n</answer>",
    ...                           "<output>71</output><answer>72</answer>",
    ...                           "<answer>72</answer>"])
    [0.5, 0.0, None]
    """
    out: list[float | None] = []
    for text in _texts(completions):
        if "<output>" not in text.lower():
            out.append(None)
            continue
        produced = parse_number(last_tag_block(text, "output"))
        out.append(0.5 if numbers_match(produced, extract_number(text, "xml3")) else 0.0)
    return out
