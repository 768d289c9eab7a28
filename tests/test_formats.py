"""Prompt formats: render/extract round trips, structure checks, messages, chat templates."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from data import (
    FORMATS,
    PromptFormat,
    apply_chat_template,
    build_messages,
    get_format,
    make_prompt_rows,
    sft_target,
)
from grpo.testing import tiny_tokenizer

REASONING = "She has 6 boxes of 12 eggs.\n6*12 = 72 eggs."
ROW = {"question": "How many eggs?", "answer": "72", "reasoning": REASONING, "id": 3}


def test_registry_and_get_format():
    assert sorted(FORMATS) == ["hash", "xml", "xml3"]
    assert all(FORMATS[name].name == name for name in FORMATS)
    assert get_format("xml") is FORMATS["xml"]
    assert get_format(FORMATS["hash"]) is FORMATS["hash"]
    valid = r"valid names: \['hash', 'xml', 'xml3'\]"
    with pytest.raises(ValueError, match=rf"unknown prompt format 'json'; {valid}"):
        get_format("json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        FORMATS["xml"].name = "other"


def test_render_exact_text():
    assert FORMATS["xml"].render("2+2 = 4", "4") == (
        "<reasoning>\n2+2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
    )
    assert FORMATS["hash"].render("2+2 = 4", "4") == "2+2 = 4\n#### 4"
    assert FORMATS["xml3"].render("2+2 = 4", "4") == (
        "<reasoning>\n2+2 = 4\n</reasoning>\n<output>\nThe answer is 4.\n</output>\n"
        "<answer>\n4\n</answer>"
    )


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize(
    "answer, value", [("72", 72.0), ("-3", -3.0), ("0.5", 0.5), ("1234", 1234.0)]
)
def test_render_then_extract_round_trip(name, answer, value):
    fmt = FORMATS[name]
    text = fmt.render(REASONING, answer)
    assert fmt.follows(text)
    assert fmt.extract(text) == answer
    assert fmt.parse(text) == value


@pytest.mark.parametrize(
    "name, text",
    [
        # reasoning only, no answer
        ("xml", "<reasoning>\n6*12 = 72\n</reasoning>"),
        # empty reasoning
        ("xml", "<reasoning>\n</reasoning>\n<answer>\n72\n</answer>"),
        # text after the answer
        ("xml", "<reasoning>x</reasoning>\n<answer>72</answer>\nand more"),
        # tags in the wrong order
        ("xml", "<answer>72</answer>\n<reasoning>x</reasoning>"),
        # a stray closing tag standing in for the reasoning
        ("xml", "<reasoning></reasoning></reasoning>\n<answer>72</answer>"),
        # an answer block smuggled into the reasoning
        ("xml", "<reasoning>x <answer>1</answer></reasoning>\n<answer>72</answer>"),
        # the xml layout is not the xml3 one (no <output>)
        ("xml3", "<reasoning>\nx\n</reasoning>\n<answer>\n72\n</answer>"),
        ("xml3", "<reasoning>x</reasoning><output></output><answer>72</answer>"),
        ("hash", "6*12 = 72"),  # no #### line
        ("hash", "#### 72"),  # no reasoning
        ("hash", "6*12 = 72\n#### 72\nDone."),  # text after the #### line
        ("hash", "6*12 = 72\n#### 70\n#### 72"),  # two #### lines
        ("hash", "6*12 = 72\n####"),  # empty answer
    ],
)
def test_follows_rejects_broken_layouts(name, text):
    assert not FORMATS[name].follows(text)


def test_follows_accepts_whitespace_variants():
    assert FORMATS["xml"].follows("  <reasoning>6*12 = 72</reasoning><answer>72</answer>\n")
    assert FORMATS["xml3"].follows(
        "<reasoning>a\nb</reasoning>\n\n<output>It is 72.</output> <answer> 72 </answer>"
    )
    assert FORMATS["hash"].follows("Step one.\nStep two.\n####72")


def test_extract_is_strict_per_format():
    # A completion in another format gives no answer to a format-specific parser.
    hash_text = FORMATS["hash"].render(REASONING, "72")
    assert FORMATS["xml"].extract(hash_text) is None
    assert FORMATS["xml3"].parse(hash_text) is None
    assert FORMATS["hash"].extract(FORMATS["xml"].render(REASONING, "72")) is None


def test_build_messages():
    messages = build_messages("What is 2+2?", "hash")
    assert messages == [
        {"role": "system", "content": FORMATS["hash"].system_prompt},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert "####" in FORMATS["hash"].system_prompt
    assert "<output>" in FORMATS["xml3"].system_prompt
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        build_messages("  ", "xml")


def test_apply_chat_template_uses_the_tokenizers_template():
    tok = tiny_tokenizer()
    messages = build_messages("What is 2+2?", "xml")
    text = apply_chat_template(tok, messages)
    system = FORMATS["xml"].system_prompt
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = apply_chat_template(tok, messages, add_generation_prompt=False)
    assert no_gen == text.removesuffix("<|im_start|>assistant\n")


def test_apply_chat_template_without_template():
    tok = tiny_tokenizer(chat_template=False)
    messages = build_messages("What is 2+2?", "hash")
    with pytest.raises(ValueError, match="has no chat template.*fallback='plain'"):
        apply_chat_template(tok, messages, fallback="error")
    with pytest.warns(UserWarning, match="no chat template; using the plain"):
        text = apply_chat_template(tok, messages)
    assert text == (
        f"System: {FORMATS['hash'].system_prompt}\n\nUser: What is 2+2?\n\nAssistant:"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not apply_chat_template(tok, messages, add_generation_prompt=False).endswith(
            "Assistant:"
        )
    with pytest.raises(ValueError, match="fallback must be 'plain' or 'error'"):
        apply_chat_template(tok, messages, fallback="none")


def test_make_prompt_rows_keeps_columns():
    out = make_prompt_rows([ROW], "xml3")
    assert out[0] == {**ROW, "prompt": build_messages(ROW["question"], "xml3")}
    assert "prompt" not in ROW  # the input rows are not modified
    with pytest.raises(ValueError, match=r"row 0: no 'question' column \(columns: \['answer'\]\)"):
        make_prompt_rows([{"answer": "1"}], "xml")


def test_sft_target():
    assert sft_target(ROW, "xml3") == (
        f"<reasoning>\n{REASONING}\n</reasoning>\n<output>\nThe answer is 72.\n</output>\n"
        "<answer>\n72\n</answer>"
    )
    assert sft_target(ROW, FORMATS["hash"]) == f"{REASONING}\n#### 72"
    with pytest.raises(ValueError, match=r"missing \['reasoning'\]"):
        sft_target({"question": "q", "answer": "1"}, "xml")


def test_sft_targets_of_loaded_rows_follow_their_format():
    from data import load_gsm8k

    rows = load_gsm8k("synthetic:30:5")
    for fmt in FORMATS.values():
        for row in rows:
            target = sft_target(row, fmt)
            assert fmt.follows(target), target
            assert fmt.extract(target) == row["answer"]


def test_prompt_format_is_a_plain_value():
    assert isinstance(FORMATS["xml"], PromptFormat)
    assert FORMATS["xml"] == dataclasses.replace(FORMATS["xml"])
