"""GSM8K data: loading (hub id, local file or folder, synthetic), answer parsing, prompt formats.

    rows = load_gsm8k("openai/gsm8k", "train")      # or a local path, or "synthetic:500"
    rows = make_prompt_rows(rows, "xml")             # adds "prompt" (system + user messages)
    text = apply_chat_template(tokenizer, rows[0]["prompt"])
    target = sft_target(rows[0], "xml")              # SFT completion from reasoning + answer
"""

from data.answers import (
    canonical_number,
    extract_answer,
    extract_number,
    numbers_match,
    parse_number,
)
from data.formats import (
    FORMATS,
    PromptFormat,
    apply_chat_template,
    build_messages,
    get_format,
    make_prompt_rows,
    plain_chat,
    sft_target,
)
from data.gsm8k import DataError, load_gsm8k, load_rows, parse_gold, strip_calculator
from data.synthetic import generate_problems

__all__ = [
    "FORMATS",
    "DataError",
    "PromptFormat",
    "apply_chat_template",
    "build_messages",
    "canonical_number",
    "extract_answer",
    "extract_number",
    "generate_problems",
    "get_format",
    "load_gsm8k",
    "load_rows",
    "make_prompt_rows",
    "numbers_match",
    "parse_gold",
    "parse_number",
    "plain_chat",
    "sft_target",
    "strip_calculator",
]
