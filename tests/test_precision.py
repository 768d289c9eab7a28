"""bf16 where the CPU has it (grpo/precision.py): the choice, the learner under bf16 autocast
with its output layer in float32, and learning under bf16 for every algorithm.

bf16 runs on any CPU (emulated where the instructions are missing: slow, not wrong), so
every test here runs everywhere; only `cpu_dtype: auto` depends on the machine, and its
tests fix what the machine reports.
"""

from __future__ import annotations

import pytest
import torch

import grpo
from grpo import precision
from grpo.logprobs import token_logprobs
from grpo.model import completion_logprobs, decoder_and_head
from grpo.testing import tiny_model
from test_trainer import make_trainer, read_metrics

BF16_UNIT_ROUNDOFF = 2.0**-9  # bf16 keeps 8 significant bits: a rounding moves a value by <= 2^-9 of it


@pytest.fixture
def machine(monkeypatch):
    """Set what the CPU and the torch build report (bf16 instructions, oneDNN) for `detect_cpu_bf16`."""
    def set_machine(isa, onednn=True):
        monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: isa)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
        precision.detect_cpu_bf16.cache_clear()

    yield set_machine
    precision.detect_cpu_bf16.cache_clear()


def test_auto_picks_bf16_only_where_the_cpu_is_fast_at_it(machine):
    cpu = torch.device("cpu")
    machine(None)
    dtype, why = precision.resolve_cpu_dtype("auto", cpu)
    assert dtype == torch.float32 and "no AVX512-BF16 or AMX" in why
    machine("AVX512-BF16")
    dtype, why = precision.resolve_cpu_dtype("auto", cpu)
    assert dtype == torch.bfloat16 and "this CPU has AVX512-BF16, which oneDNN uses" in why
    machine("AMX", onednn=False)  # the instructions, but no kernels that use them in this build
    dtype, why = precision.resolve_cpu_dtype("auto", cpu)
    assert dtype == torch.float32 and "no oneDNN" in why
    assert precision.resolve_cpu_dtype("float32", cpu)[0] == torch.float32
    machine(None)
    dtype, why = precision.resolve_cpu_dtype("bfloat16", cpu)  # forced: runs, and says it is slow here
    assert dtype == torch.bfloat16 and "slow here" in why
    assert precision.resolve_cpu_dtype("auto", torch.device("cuda", 0)) == (None, "")
    with pytest.raises(grpo.ConfigError, match="cpu_dtype='bfloat16' applies on CPU only; this run is on cuda:0"):
        precision.resolve_cpu_dtype("bfloat16", torch.device("cuda", 0))
    with pytest.raises(grpo.ConfigError, match="cpu_dtype='fp16'"):
        precision.resolve_cpu_dtype("fp16", cpu)
    with pytest.raises(grpo.ConfigError, match="cpu_dtype='bf16': choose one of auto, float32, bfloat16"):
        grpo.GRPOConfig(cpu_dtype="bf16")


def test_the_trainer_says_which_precision_each_part_uses(machine, tmp_path, capsys):
    machine("AVX512-BF16")
    trainer = make_trainer(tmp_path, cpu_dtype="auto")
    line = capsys.readouterr().out
    assert trainer.cpu_dtype == torch.bfloat16 and trainer.fast_policy.dtype == torch.bfloat16
    assert "precision: bfloat16 on CPU (this CPU has AVX512-BF16, which oneDNN uses" in line
    assert "LoRA weights, optimizer, log-probs and loss in float32" in line
    machine(None)
    trainer = make_trainer(tmp_path, cpu_dtype="auto")
    assert trainer.cpu_dtype == torch.float32 and trainer.fast_policy.dtype == torch.float32
    assert "precision: float32 on CPU (this CPU has no AVX512-BF16 or AMX" in capsys.readouterr().out


def _batch(seed=0, B=4, Tp=6, T=24):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, 100, (B, Tp), generator=g)
    prompt_mask = torch.ones(B, Tp, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    completion_ids = torch.randint(4, 100, (B, T), generator=g)
    lengths = torch.tensor([T, T - 5, 7, 1])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_bf16_autocast_logprobs_agree_with_float32_within_bf16_precision():
    # Under autocast every matmul of the decoder rounds its two inputs to bf16 (each by <= u =
    # 2^-9 relative) and accumulates in float32. A logit z = h . w then moves by about
    # 2u |z| per layer the error passes through, plus attention's average over up to T_ctx
    # positions, whose rounding errors add like a random walk: |dz| <~ 2u |z| (L + sqrt(T_ctx)).
    # A log-prob moves by at most twice the largest logit change (the log-sum-exp is 1-Lipschitz
    # in the max norm), so per token: |d logp| <= 4u max|z| (L + sqrt(T_ctx)), L = 2 layers.
    model = tiny_model()
    batch = _batch()
    fp32 = completion_logprobs(model, *batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = completion_logprobs(model, *batch)
    assert bf16.dtype == torch.float32
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        hidden = decoder(input_ids=torch.cat(batch[:3:2], 1)).last_hidden_state
        max_logit = float((hidden @ head.T).abs().max())
    T_ctx = batch[0].shape[1] + batch[2].shape[1]
    bound = 4 * BF16_UNIT_ROUNDOFF * max_logit * (2 + T_ctx**0.5)
    diff = (bf16 - fp32).abs()[batch[3].bool()]
    assert float(diff.max()) <= bound, (float(diff.max()), bound)
    assert float(diff.max()) > 0  # the decoder did run in bf16
    assert bool((bf16[batch[3] == 0] == 0).all())


@pytest.mark.parametrize("method", ["fused", "naive"])
def test_under_autocast_the_output_layer_stays_float32(method):
    # The decoder's bf16 hidden states go into the log-prob kernel, which computes in float32:
    # completion_logprobs under autocast equals the kernel run on those same hidden states
    # outside autocast, exactly. The naive kernel shows why the fence is needed: under
    # autocast its matmul would round hidden states and head to bf16.
    model = tiny_model()
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(1)
    captured = {}
    decoder, head = decoder_and_head(model)
    hook = decoder.register_forward_hook(lambda m, a, out: captured.update(hidden=out.last_hidden_state))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, method=method)
    hook.remove()
    hidden = captured["hidden"][:, prompt_ids.shape[1] - 1 : -1]
    keep = completion_mask.bool()
    want = token_logprobs(hidden[keep], head, completion_ids[keep], method=method)
    assert torch.equal(got[keep], want)
    if method == "naive":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = token_logprobs(hidden[keep], head, completion_ids[keep], method=method)
        assert not torch.equal(rounded, want)


ALGORITHMS = {"grpo": {}, "dr_grpo": {}, "dapo": {"overlong_penalty": 0.0}, "rloo": {}, "gspo": {},
              "reinforce_pp": {}, "ppo": {}}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_toy_task_learns_under_bf16(tmp_path, algorithm):
    """The learning tests' budget (12 steps, lr 2e-2, 32 completions a step), all in bf16: the
    bf16 sampling copy, the learner under autocast, TIS correcting the mismatch."""
    trainer = make_trainer(tmp_path, max_steps=12, algorithm=algorithm, cpu_dtype="bfloat16", **ALGORITHMS[algorithm])
    assert trainer.fast_policy.dtype == torch.bfloat16 and trainer.config.sampler_correction == "tis"
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    rewards = [m["reward"] for m in metrics]
    assert rewards[0] < 0.3 and sum(rewards[-2:]) / 2 >= 0.9, rewards
    assert all(m["mismatch/kl"] > 0 for m in metrics)  # a bf16 sampler differs from the learner
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 for p in lora)
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
