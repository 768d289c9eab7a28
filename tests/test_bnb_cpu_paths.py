"""One compute path for a 4-bit base on every CPU (grpo.model.disable_cpu_4bit_packing).

bitsandbytes 0.50 decides per machine: `Linear4bit.__init__` records whether the CPU has
AVX512-BF16, and where it has, a layer's first forward in eval mode without grad packs its
weight for a bfloat16 kernel that has no gradients. Both decisions are simulated on this one
machine by patching `bitsandbytes.nn.modules.has_avx512bf16` before the model is built; the
model comes from our loader or, built by the user, goes through `attach_adapters`.

Reference: a float32 copy of the model whose `Linear4bit` layers are `nn.Linear` holding the
dequantized weights. bitsandbytes' unpacked CPU path is `linear(x, dequantize_4bit(W))`
(backends/default/ops.py, `_gemm_4bit_default_impl`), the same float32 function, so the two
can differ only by the order of float32 sums: for a dot product of K <= 128 terms (the widths
of the tiny model) typically sqrt(K) * 2^-24 ~ 7e-7 of the sum of |terms|, at worst
K * 2^-24 ~ 7.6e-6. RTOL = 1e-5 of the largest logit (or gradient entry) covers a few layers of
that (measured here: bitwise equal). The bfloat16 kernel rounds inputs and block scales to 8
significant bits (2^-8 ~ 3.9e-3 relative), which moved the logits by 9e-3 relative: ~1000 RTOL.
"""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.nn import Linear4bit  # noqa: E402

import grpo.model  # noqa: E402
from grpo.config import GRPOConfig  # noqa: E402
from grpo.model import ModelLoadError, attach_adapters, load_base_model  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(bnbf, "_convert_weight_packed_for_cpu"),
                                reason="this bitsandbytes has no bfloat16 CPU packing: one CPU path only")

RTOL = 1e-5  # of the largest |value| compared; derived in the module docstring
IDS = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=[True, False], ids=["avx512bf16", "no-avx512bf16"])
def machine(request, monkeypatch):
    """What `Linear4bit.__init__` records about the CPU (bitsandbytes/nn/modules.py:573)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: request.param)
    return request.param


def user_4bit_base(path):
    """A 4-bit base as a user builds it, without our loader."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"},
                                                dtype=torch.float32)


def policy(path, how: str):
    """Our 4-bit PeftModel: a base from load_base_model (double quantization) or the user's
    (single), LoRA on every projection, A and B random so the adapter is in the path."""
    if how == "loader":
        base = load_base_model(str(path), load_in_4bit=True, device=torch.device("cpu"))
    else:
        base = user_4bit_base(path)
    model = attach_adapters(base, GRPOConfig(lora_r=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def dense_reference(model):
    """A copy of `model` whose Linear4bit layers are nn.Linear holding the dequantized weights."""
    ref = copy.deepcopy(model)
    for name, layer in list(ref.named_modules()):
        if isinstance(layer, Linear4bit):
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            dense.weight.data = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            if layer.bias is not None:
                dense.bias.data = layer.bias.data.clone()
            ref.set_submodule(name, dense)
    return ref


def eval_logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_grads(model):
    """LoRA gradients of one training forward/backward."""
    model.train()
    model.zero_grad()
    model(input_ids=IDS).logits.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def packed(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=RTOL * want.abs().max().item())


@pytest.mark.parametrize("how", ["loader", "user"])
def test_eval_forward_stays_float32_and_unpacked(machine, how, tiny_model_dir):
    # The patch simulates the machine: a layer built now records it...
    assert Linear4bit(64, 64).support_avx512bf16_for_cpu is machine
    model = policy(tiny_model_dir, how)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    # ...and ours have the choice off.
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
    ref = dense_reference(model)
    got = eval_logits(model)
    assert packed(model) == []
    assert_close(got, eval_logits(ref))


@pytest.mark.parametrize("how", ["loader", "user"])
def test_lora_gradients_unchanged_by_an_eval_forward(machine, how, tiny_model_dir):
    model = policy(tiny_model_dir, how)
    ref = lora_grads(dense_reference(model))
    before = lora_grads(model)
    eval_logits(model)  # what evaluation, or a rollout through the PEFT model, does
    after = lora_grads(model)
    assert before.keys() == after.keys() == ref.keys() and len(ref) == 28
    for name in ref:
        assert ref[name].abs().max() > 0
        # The same float32 kernels on the same values: equal to rounding (in practice bitwise).
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6 * before[name].abs().max().item())
        assert_close(after[name], ref[name])


def test_a_model_already_packed_is_refused(tiny_model_dir):
    # Packing is plain torch code: it runs on any CPU, as an eval forward runs it on an AVX512-BF16 one.
    base = user_4bit_base(tiny_model_dir)
    q_proj = base.model.layers[0].self_attn.q_proj
    q_proj.weight.data, q_proj.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
        q_proj.weight.data, q_proj.weight.quant_state)
    with pytest.raises(ModelLoadError, match="1 of the model's 14 4-bit layers were packed"):
        attach_adapters(base, GRPOConfig(lora_r=4))


@pytest.mark.parametrize("nested", [False, True], ids=["single-quant", "double-quant"])
def test_bitsandbytes_cannot_unpack_exactly(nested):
    """Why a packed model is refused rather than unpacked: bitsandbytes' inverse gives back
    the 4-bit codes but not the block scales (rounded to bfloat16; without double
    quantization also left transposed: measured off by 40% of the largest weight)."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    codes, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
    original = bnbf.dequantize_4bit(codes, state)
    codes_back, state = bnbf._convert_weight_packed_for_cpu_inverse(
        *bnbf._convert_weight_packed_for_cpu(codes.clone(), state))
    assert torch.equal(codes_back, codes)
    assert not torch.equal(bnbf.dequantize_4bit(codes_back, state), original)


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
def test_without_the_guard_an_avx512bf16_cpu_packs_and_drifts(monkeypatch, tiny_model_dir):
    """Documents why the guard exists; bitsandbytes has the bfloat16 kernel only on an AVX512-BF16 CPU."""
    if not bnbf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never packs here")
    monkeypatch.setattr(grpo.model, "disable_cpu_4bit_packing", lambda model: None)
    model = policy(tiny_model_dir, "loader")
    ref = dense_reference(model)
    want = eval_logits(ref)
    got = eval_logits(model)
    assert len(packed(model)) == 14
    assert (got - want).abs().max() > 10 * RTOL * want.abs().max()
    # Training after it runs the same kernel, whose backward is missing: wrong LoRA gradients.
    grads, ref_grads = lora_grads(model), lora_grads(ref)
    assert any((grads[n] - ref_grads[n]).abs().max() > 10 * RTOL * ref_grads[n].abs().max() for n in ref_grads)
