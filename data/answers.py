"""Answer parsing for GSM8K-style math answers: pure string functions, no heavy imports.

Three layers, used by the rewards, the evaluation and the data loaders:

- `extract_answer(text, fmt)`: the raw answer span of a completion (what is inside the
  last `<answer>` block, after the last `####`, inside the last `\\boxed{}`, ...).
- `parse_number(text)`: one number from such a span (the LAST number it contains), with
  the usual normalizations: `$`, thousands commas, units and words, `%`, fractions, LaTeX.
- `numbers_match(pred, gold)`: tolerant comparison; `canonical_number(x)`: "72", "0.5".

What `parse_number` does not understand (it then reads the digits it can see, or None):
numbers in words ("seventy-two"), European decimals ("1.234,5"), mixed numbers ("1 1/2"
reads as 1/2), exponents ("1e5" reads as 5), ranges ("3-4" reads as 4, the hyphen is not
a minus sign after a digit or a letter).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = [
    "ANSWER_FORMATS",
    "parse_number",
    "extract_answer",
    "extract_number",
    "numbers_match",
    "canonical_number",
    "last_tag_block",
]

# Explicit formats of `extract_answer`; None means "auto".
ANSWER_FORMATS = ("xml", "xml3", "hash", "boxed")

# One number: not glued to a letter, digit, "." or closing bracket on its left (so that
# "3-4" and "x-1" do not read as -4 and -1, "Q1" has no number, and a match never starts
# inside a number); an optional minus sign; an optional `$` (a space may follow it); either a
# thousands-grouped integer ("1,234,567"), a plain integer, or a bare decimal (".5");
# an optional decimal part; an optional "/ denominator" (a simple fraction).
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(
    rf"(?<![0-9A-Za-z)\]}}.])(?P<sign>-)?(?:\$\s?)?(?P<num>{_UNSIGNED})"
    rf"(?:\s?/\s?(?P<den>{_UNSIGNED}))?"
    # a grouped number must not be followed by a digit ("1,2345" is not 1,234 then 5)
    r"(?!\d)"
)

_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_tag_block(text: str, tag: str) -> str | None:
    """The content of the last `<tag>...</tag>` block (tags case-insensitive): the text
    between the last closing tag and the nearest opening tag before it; None when there
    is no such pair. Linear time (a lazy regex over many unclosed tags is quadratic).

    Example: last_tag_block("<answer>1</answer> <answer>2</answer>", "answer") -> "2";
    last_tag_block("<answer>1<answer>2</answer>", "answer") -> "2".
    """
    close = None
    for close in re.finditer(rf"</{re.escape(tag)}>", text, re.IGNORECASE):
        pass
    if close is None:
        return None
    start = None
    for start in re.finditer(rf"<{re.escape(tag)}>", text[: close.start()], re.IGNORECASE):
        pass
    return None if start is None else text[start.end() : close.start()]


def _last_braced(text: str, opener: re.Pattern[str]) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), or None when there is none
    or it is never closed (a truncated completion)."""
    starts = [m.end() for m in opener.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _normalize(text: str) -> str:
    """Rewrite the LaTeX and Unicode spellings of numbers into the plain ones that
    `_NUMBER_RE` reads: `\\frac{a}{b}` -> `a/b`, `1{,}234` -> `1,234`, `−` -> `-`."""
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\$", "$")
    text = text.replace("\\!", "").replace("\\,", "").replace("\\%", "%")
    # ^ "\," is a LaTeX thin space, also used as a thousands separator ("1\,234")
    return _FRAC_RE.sub(lambda m: f"{m.group(1).strip()}/{m.group(2).strip()}", text)


def _value(m: re.Match[str]) -> float | None:
    """The float of one `_NUMBER_RE` match; None for a fraction over zero."""
    num = float(m.group("num").replace(",", ""))
    if m.group("den") is not None:
        den = float(m.group("den").replace(",", ""))
        if den == 0:
            return None
        num /= den
    return -num if m.group("sign") else num


def _last_number_match(text: str) -> re.Match[str] | None:
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return last


def parse_number(text: str | None) -> float | None:
    """The last number in `text`, as a float; None when there is none.

    Example: "$1,234.50" -> 1234.5; "18 dollars." -> 18.0; "10%" -> 10.0;
    "2/3" -> 0.666..; "-1/2" -> -0.5; "\\boxed{\\frac{3}{4}}" -> 0.75;
    "first 5, then 7" -> 7.0; "no number" -> None; "" -> None; "1/0" -> None.

    A `\\boxed{...}` is authoritative: when present, only its content is read.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"parse_number expects a str or None, got {type(text).__name__}: {text!r:.80}")
    boxed = _last_braced(text, _BOXED_RE)
    if boxed is not None:
        text = boxed
    m = _last_number_match(_normalize(text))
    return None if m is None else _value(m)


def extract_answer(text: str, fmt: str | None = None) -> str | None:
    """The raw answer span of a completion (stripped), or None when there is none.

    fmt:
      "xml"   the content of the last `<answer>...</answer>` block
      "xml3"  three-part `<reasoning>/<output>/<answer>`: the last `<answer>` block too
      "hash"  the rest of the line after the last `####`
      "boxed" the content of the last `\\boxed{...}`
      None    auto: the first of the above that is present, in the order `<answer>`,
              `####`, `\\boxed{}`; else the last number in the text (its spelling,
              e.g. "1,234.50"); else None.

    An explicit fmt is strict: when its marker is missing (or an `<answer>` tag is never
    closed) the result is None, so that a format-specific reward gives no credit to a
    completion that did not follow the format. Auto mode is lenient (for correctness).

    Example: extract_answer("so <answer> 72 </answer>") -> "72";
    extract_answer("...\\n#### 1,234") -> "1,234"; extract_answer("it is 5 or 6") -> "6";
    extract_answer("it is 6", "xml") -> None.
    """
    if fmt is not None and fmt not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer format fmt={fmt!r}; expected one of {ANSWER_FORMATS} or None")
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}: {text!r:.80}")
    if fmt in (None, "xml", "xml3"):
        block = last_tag_block(text, "answer")
        if block is not None:
            return block.strip()
        if fmt is not None:
            return None
    if fmt in (None, "hash"):
        lines = _HASH_RE.findall(text)
        if lines:
            return lines[-1].strip()
        if fmt is not None:
            return None
    if fmt in (None, "boxed"):
        boxed = _last_braced(text, _BOXED_RE)
        if boxed is not None:
            return boxed.strip()
        if fmt is not None:
            return None
    m = _last_number_match(_normalize(text))
    return None if m is None else m.group(0).strip()


def extract_number(text: str, fmt: str | None = None) -> float | None:
    """`parse_number(extract_answer(text, fmt))`. Example: "<answer>$18</answer>" -> 18.0."""
    return parse_number(extract_answer(text, fmt))


def numbers_match(
    pred: float | None, gold: float | None, rel_tol: float = 1e-4, abs_tol: float = 1e-6
) -> bool:
    """True when both are numbers and close (`math.isclose`); None or NaN never matches.

    rel_tol=1e-4 accepts a rounded fraction ("0.6667" for 2/3) and float noise. Two
    integers match only when equal: a relative tolerance alone would merge large integer
    answers (GSM8K has golds up to 109,200,000, where 1e-4 relative is 10,920).
    Example: numbers_match(0.6667, 2/3) -> True; numbers_match(109199000, 109200000) -> False.
    """
    if pred is None or gold is None:
        return False
    pred, gold = float(pred), float(gold)
    if pred.is_integer() and gold.is_integer():
        return pred == gold
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)


def canonical_number(x: float) -> str:
    """The plain spelling of a finite number: 72.0 -> "72", 0.5 -> "0.5", -3.0 -> "-3",
    1234.5 -> "1234.5", 1e-07 -> "0.0000001" (no trailing ".0", no exponent, no "-0")."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"canonical_number needs a finite number, got {x!r}")
    if x.is_integer():
        return str(int(x))
    # repr is the shortest string that round-trips; Decimal spells it without exponent
    return format(Decimal(repr(x)), "f")
