"""A newcomer's first screen: our own calls raise no deprecation warning, and the
bitsandbytes notice about a hub kernel (which cannot be fetched offline, and which this
library never uses) is not logged when our package brings bitsandbytes in."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from grpo.rollout import generate_rollout, sample
from grpo.testing import chat_prompt, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    """The recorded warnings that are deprecations (by category or by wording)."""
    return [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in record
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        or "deprecat" in str(w.message).lower()
        or "past_key_values" in str(w.message)
    ]


def peft_wrapped(model):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():  # peft's own deprecated read (see train.py); not under test here
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "peft"])
def test_decode_loops_raise_no_deprecation_warning(decode, wrap):
    model = tiny_model()
    if wrap:
        model = peft_wrapped(model)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, out_mask, _ = sample(model, ids, mask, max_new_tokens=5, eos_token_ids=[2], pad_token_id=0,
                                  temperature=1.0, generator=torch.Generator().manual_seed(0),
                                  group_size=2, decode=decode)
    assert out.shape[0] == 4 and out_mask.sum() > 0
    assert deprecations(record) == []


def test_generate_rollout_raises_no_deprecation_warning():
    model, tok = tiny_model(), tiny_tokenizer()
    prompts = [chat_prompt(tok, "What is 2 + 3?"), chat_prompt(tok, "Tom has 4 apples.")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rollout = generate_rollout(model, tok, prompts, group_size=2, max_prompt_length=None, max_new_tokens=4,
                                   temperature=1.0, top_p=1.0, top_k=0, generator=None, prompt_seeds=[1, 2])
    assert rollout.completion_ids.shape[0] == 4
    assert deprecations(record) == []


def test_bitsandbytes_kernels_notice_is_dropped_and_nothing_else(caplog):
    import grpo  # noqa: F401  (installs the filter)

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb_logger.warning(BNB_NOTICE + ": %s. Please make sure you already `pip install kernels`",
                           "No module named 'kernels'")
        bnb_logger.warning("some other bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any(BNB_NOTICE in m for m in messages)
    assert "some other bitsandbytes warning" in messages  # only that one message is dropped


def test_importing_bitsandbytes_through_our_package_logs_no_kernels_notice():
    """In a fresh interpreter, as train.py does: our package first, then peft (which
    imports bitsandbytes). On a CPU with AVX512-BF16 bitsandbytes would log the notice."""
    code = ("import grpo, grpo.model\n"
            "from peft import PeftModel\n"
            "import sys\n"
            "assert 'bitsandbytes' in sys.modules, 'peft no longer imports bitsandbytes'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr, done.stderr
