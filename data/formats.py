"""Prompt formats: a system prompt, the completion layout it asks for, and its answer parser.

    xml   <reasoning>\\n...\\n</reasoning>\\n<answer>\\n72\\n</answer>
    hash  reasoning lines, then a final line `#### 72` (GSM8K's own solution layout)
    xml3  <reasoning>...</reasoning>\\n<output>The answer is 72.</output>\\n<answer>72</answer>

A format renders the SFT target from a row's reasoning and gold answer (`render`), reads
the answer back from a completion (`extract`, `parse`, via `data.answers`), and says whether
a completion follows its layout (`follows`). Prompts are chat messages (system + user),
rendered with the tokenizer's own chat template (`apply_chat_template`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from data.answers import extract_answer, extract_number


@dataclass(frozen=True)
class PromptFormat:
    """A named completion layout: its system prompt, target renderer and structure check."""

    name: str
    system_prompt: str
    template: str  # the SFT target with `{reasoning}` and `{answer}` slots
    pattern: re.Pattern[str]  # a completion that follows the layout matches it in full

    def render(self, reasoning: str, answer: str) -> str:
        """The target completion.

        Example (xml): `render("2+2=4", "4")` ->
        `"<reasoning>\\n2+2=4\\n</reasoning>\\n<answer>\\n4\\n</answer>"`.
        """
        return self.template.format(reasoning=reasoning.strip(), answer=str(answer).strip())

    def extract(self, text: str) -> str | None:
        """The raw answer span of `text` in this format (None when its marker is missing)."""
        return extract_answer(text, self.name)

    def parse(self, text: str) -> float | None:
        """The answer of `text` in this format as a number (None when there is none)."""
        return extract_number(text, self.name)

    def follows(self, text: str) -> bool:
        """Whether `text` has exactly this layout (non-empty parts, nothing after the answer)."""
        return self.pattern.fullmatch(text.strip()) is not None


def _tags(*names: str) -> re.Pattern[str]:
    """`<a>x</a>\\n<b>y</b>...`: each tag once, in order, non-empty, only whitespace between."""
    not_tag = rf"(?!</?(?:{'|'.join(names)})>)"  # the next characters do not open/close a tag
    parts = [rf"<{n}>(?:{not_tag}[\s\S])*?{not_tag}\S(?:{not_tag}[\s\S])*?</{n}>" for n in names]
    return re.compile(r"\s*".join(parts))


XML = PromptFormat(
    name="xml",
    system_prompt=(
        "Solve the math problem. Think step by step, then give the final answer as a "
        "number. Respond in the following format:\n"
        "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
    ),
    template="<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>",
    pattern=_tags("reasoning", "answer"),
)

HASH = PromptFormat(
    name="hash",
    system_prompt=(
        "Solve the math problem. Think step by step, then end your response with a final "
        "line of the form '#### N', where N is the final answer as a number."
    ),
    template="{reasoning}\n#### {answer}",
    # Some reasoning without `####`, then one `####` line at the very end.
    pattern=re.compile(
        r"(?:(?!####)[\s\S])*?(?!####)\S(?:(?!####)[\s\S])*"  # reasoning, not blank
        r"\n####[ \t]*[^\s#][^\n#]*"  # the answer line
    ),
)

XML3 = PromptFormat(
    name="xml3",
    system_prompt=(
        "Solve the math problem. Think step by step, then state the result in one "
        "sentence, then give the final answer as a bare number. Respond in the following "
        "format:\n<reasoning>\n...\n</reasoning>\n<output>\n...\n</output>\n"
        "<answer>\n...\n</answer>"
    ),
    template=(
        "<reasoning>\n{reasoning}\n</reasoning>\n<output>\nThe answer is {answer}.\n</output>\n"
        "<answer>\n{answer}\n</answer>"
    ),
    pattern=_tags("reasoning", "output", "answer"),
)

FORMATS: dict[str, PromptFormat] = {f.name: f for f in (XML, HASH, XML3)}


def get_format(fmt: PromptFormat | str) -> PromptFormat:
    """The format named `fmt` (a PromptFormat is returned as is)."""
    if isinstance(fmt, PromptFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; valid names: {sorted(FORMATS)}")
    return FORMATS[fmt]


def build_messages(question: str, fmt: PromptFormat | str) -> list[dict]:
    """The chat messages of a question: system prompt of `fmt`, then the question.

    `[{"role": "system", "content": fmt.system_prompt}, {"role": "user", "content": question}]`
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r:.80}")
    return [
        {"role": "system", "content": get_format(fmt).system_prompt},
        {"role": "user", "content": question},
    ]


def plain_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The fallback template: `"System: ...\\n\\nUser: ...\\n\\nAssistant:"`.

    Each message is `"{Role}: {content}"`, messages joined by a blank line; the generation
    prompt adds a final `"Assistant:"` (the model's answer follows after a space).
    """
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if add_generation_prompt:
        parts.append("Assistant:")
    return "\n\n".join(parts)


def apply_chat_template(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    fallback: str = "plain",
    **template_kwargs,
) -> str:
    """The prompt text of `messages` from the tokenizer's own chat template.

    `template_kwargs` go to the template as they are (e.g. `enable_thinking=False` for
    Qwen3; nothing is passed unless asked). A tokenizer without a chat template raises a
    ValueError when `fallback="error"`, and with `fallback="plain"` uses `plain_chat`
    with a warning.
    """
    if fallback not in ("plain", "error"):
        raise ValueError(f"fallback must be 'plain' or 'error', got {fallback!r}")
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if fallback == "error":
        raise ValueError(
            f"tokenizer {name!r} has no chat template: use an instruct/chat model's "
            "tokenizer, set `tokenizer.chat_template` to a Jinja template, or pass "
            "fallback='plain' for a 'System: ...\\n\\nUser: ...\\n\\nAssistant:' prompt"
        )
    warnings.warn(
        f"tokenizer {name!r} has no chat template; using the plain "
        "'System: ...\\n\\nUser: ...\\n\\nAssistant:' prompt (set tokenizer.chat_template, or use an "
        "instruct model's tokenizer, for the prompt the model was tuned on)",
        stacklevel=2,
    )
    return plain_chat(messages, add_generation_prompt)


def make_prompt_rows(rows: list[dict], fmt: PromptFormat | str) -> list[dict]:
    """Copies of `rows` with `"prompt"` (the chat messages of `row["question"]`) added.

    All other columns are kept: the trainer passes them to the reward functions.
    """
    fmt = get_format(fmt)
    out = []
    for i, row in enumerate(rows):
        if "question" not in row:
            raise ValueError(f"row {i}: no 'question' column (columns: {sorted(row)})")
        out.append({**row, "prompt": build_messages(row["question"], fmt)})
    return out


def sft_target(row: dict, fmt: PromptFormat | str) -> str:
    """The SFT completion of a loaded row: `fmt.render(row["reasoning"], row["answer"])`.

    Example (xml3, reasoning "6*12 = 72", answer "72"):
    `"<reasoning>\\n6*12 = 72\\n</reasoning>\\n<output>\\nThe answer is 72.\\n</output>\\n"`
    `"<answer>\\n72\\n</answer>"`.
    """
    missing = [c for c in ("reasoning", "answer") if c not in row]
    if missing:
        raise ValueError(
            f"sft_target needs 'reasoning' and 'answer' (as load_gsm8k gives); "
            f"missing {missing}, columns: {sorted(row)}"
        )
    return get_format(fmt).render(row["reasoning"], row["answer"])


__all__ = [
    "FORMATS",
    "PromptFormat",
    "apply_chat_template",
    "build_messages",
    "get_format",
    "make_prompt_rows",
    "plain_chat",
    "sft_target",
]
