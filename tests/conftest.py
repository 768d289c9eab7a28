"""Shared fixtures: the tiny tokenizer and decoders of the sampler tests, a tiny model folder
for the CLIs, and one tiny finished run (SFT + GRPO)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tok():
    """The offline tiny tokenizer (with a chat template)."""
    from grpo.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["qwen3", "gpt2"])
def model(request):
    """Both tiny decoders: Qwen3 (RoPE, grouped KV heads) and GPT-2 (absolute positions)."""
    from grpo.testing import tiny_gpt2, tiny_model

    return tiny_model() if request.param == "qwen3" else tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder holding `tiny_model()` and `tiny_tokenizer()` as save_pretrained writes them:
    a `--model` for train.py and test.py that loads offline in well under a second."""
    from grpo.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_train_argv(tiny_model_dir) -> list[str]:
    """train.py flags for a run of seconds on the tiny model: 1 step of 2 prompts x 2
    completions of 4 tokens, LoRA rank 2, no KL pass, no progress bar, no periodic saves.
    Append `--output_dir DIR` and the flags under test (later flags win)."""
    return [
        "--model", str(tiny_model_dir), "--dataset", "synthetic:4", "--max_steps", "1",
        "--num_generations", "2", "--batch_size", "4", "--micro_batch_size", "4",
        "--max_completion_length", "4", "--max_prompt_length", "64", "--lora_r", "2", "--beta", "0",
        "--sft_steps", "1", "--sft_batch_size", "2", "--progress_bar", "false",
        "--log_completions_steps", "0", "--save_steps", "0",
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_train_argv) -> Path:
    """The output_dir of one finished `train.py --mode both` run on the tiny model: sft/adapter/,
    sft/ checkpoints and checkpoint-1/. Read-only: copy it before changing anything in it."""
    import train

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "write_plots", lambda run_dir: [])  # matplotlib's import and 6 PNGs: seconds
        code = train.main(tiny_train_argv + ["--output_dir", str(out), "--mode", "both"])
    assert code == 0 and (out / "checkpoint-1").is_dir(), f"the tiny run failed (exit {code})"
    return out
