"""The merged fast copy of the policy (grpo.fastgen.FastPolicy) against the PEFT model it
copies: logits, greedy and sampled rollouts, refresh after an update, and a trainer step.

Tolerances: in float32 the copy computes (W0 + s B A) x where PEFT computes W0 x + s B (A x),
the same sum in another order. Logits of this tiny model reach |z| ~ 10; two layers of
float32 rounding (eps 1.2e-7) over sums of 64-128 terms give differences ~1e-6 (measured
<= 1e-5), so atol 5e-5 is tight: a missing LoRA delta moves logits by ~1e-1 (checked below).
"""

from __future__ import annotations

import pytest
import torch

from grpo.fastgen import FastPolicy, FastPolicyError
from grpo.model import disable_cpu_4bit_packing
from grpo.rollout import generate_rollout, sample
from grpo.testing import tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "v_proj", "up_proj"]  # a subset, so untargeted layers exist
ATOL = 5e-5
PROMPTS = ["<|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


def randomize_lora(model, seed: int, std: float = 0.2) -> None:
    """Nonzero A and B (PEFT initializes B = 0, which would make the merge a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_policy(base=None, seed: int = 1, dropout: float = 0.1):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    model = get_peft_model(base if base is not None else tiny_model(), config)
    randomize_lora(model, seed)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def nf4_base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    return path


def load_nf4(path):
    """A 4-bit base on the one CPU path the trainer gives it (attach_adapters calls
    disable_cpu_4bit_packing): dequantize to float32, then multiply, also in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"},
                                                 dtype=torch.float32)
    disable_cpu_4bit_packing(model)
    return model


IDS = torch.randint(4, 100, (3, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- logits
def test_logits_match_peft_full_precision():
    model = peft_policy().eval()
    fast = FastPolicy(model)
    ref = logits(model, IDS)
    assert torch.allclose(logits(fast.model, IDS), ref, atol=ATOL, rtol=0)
    # Not vacuous: the adapter moves the logits far more than the tolerance.
    with model.disable_adapter():
        assert (logits(model, IDS) - ref).abs().max() > 1e-1


def test_logits_match_peft_nf4(nf4_base_dir):
    # Both paths use the same dequantized NF4 weights (bitsandbytes' CPU forward calls
    # dequantize_4bit to float32 and then a float32 matmul; FastPolicy calls dequantize_4bit
    # once), so only the summation order differs: the float32 tolerance applies unchanged.
    # Without disable_cpu_4bit_packing (load_nf4), on a CPU with AVX512-BF16 the first eval
    # forward would switch PEFT to a bfloat16 kernel and repack the 4-bit weights, which the
    # copy (built on first use) then dequantizes as garbage: logits off by 13 (of 9) measured.
    model = peft_policy(load_nf4(nf4_base_dir)).eval()
    fast = FastPolicy(model)
    ref = logits(model, IDS)
    assert torch.allclose(logits(fast.model, IDS), ref, atol=ATOL, rtol=0)
    # Not vacuous: the base really is quantized (NF4 moves the weights), and the copy holds
    # the dequantized values, not the float32 originals.
    original = tiny_model().model.layers[0].self_attn.k_proj.weight  # untargeted: no LoRA
    copied = fast.model.model.layers[0].self_attn.k_proj.weight
    assert (copied - original).abs().max() > 1e-3
    assert copied.dtype == torch.float32 and not hasattr(copied, "quant_state")
    # No dense copy of the quantized base is held: the copy's own dense tensors are its
    # parameters, and what it keeps per LoRA layer is the base's 4-bit weight itself.
    held = [base for _, _, base in fast._lora.values()]
    assert held and all(hasattr(b, "quant_state") and b.dtype == torch.uint8 for b in held)
    # A refresh after an update dequantizes the base again, re-merges and still matches PEFT.
    randomize_lora(model, seed=3)
    fast.refresh()
    assert torch.allclose(logits(fast.model, IDS), logits(model, IDS), atol=ATOL, rtol=0)


def test_tied_and_untargeted_weights_are_shared_not_copied():
    model = peft_policy().eval()
    fast = FastPolicy(model).model
    base = model.get_base_model()
    assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()  # still tied
    assert fast.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    k_fast, k_base = fast.model.layers[0].self_attn.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight
    assert k_fast.data_ptr() == k_base.data_ptr()  # untargeted layer: no copy
    q_fast = fast.model.layers[0].self_attn.q_proj.weight
    q_base = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_fast.data_ptr() != q_base.data_ptr()  # targeted: own merged weight, base untouched


# ---------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollout_through_fast_copy_equals_peft(temperature):
    # Greedy: argmax of logits equal to ~1e-6 (no near-ties here). Sampled: the same seeded
    # uniform draws against probabilities equal to ~1e-7 pick the same tokens.
    model, tok = peft_policy(), tiny_tokenizer()
    fast = FastPolicy(model)

    def run(m):
        return generate_rollout(m, tok, PROMPTS, group_size=3, max_prompt_length=None, max_new_tokens=12,
                                temperature=temperature, top_p=1.0, top_k=0,
                                generator=torch.Generator().manual_seed(7))

    ours, ref = run(fast.refresh()), run(model)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_mask, ref.completion_mask)
    assert ours.completion_texts == ref.completion_texts


def test_shared_prefill_equals_repeated_prompts():
    # sample(group_size=G) prefills each prompt once and repeats its cache G times; it must
    # give the tokens of sampling the G-times repeated prompts, seed for seed.
    model, tok = tiny_model(), tiny_tokenizer()
    from grpo.rollout import encode_prompts

    ids, mask, _ = encode_prompts(tok, PROMPTS, None)  # [2, Tp]
    kw = dict(max_new_tokens=10, eos_token_ids=[2], pad_token_id=0, temperature=1.0)
    shared = sample(model, ids, mask, group_size=4, generator=torch.Generator().manual_seed(3), **kw)
    repeated = sample(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                      generator=torch.Generator().manual_seed(3), **kw)
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="group_size"):
        sample(model, ids, mask, group_size=0, **kw)


# ---------------------------------------------------------------------------- refresh
def test_refresh_follows_an_update_and_touches_only_lora_layers():
    model = peft_policy().eval()
    fast = FastPolicy(model)
    expected = {f"model.layers.{i}.{part}.{name}" for i in range(2)
                for part, name in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "up_proj")]}
    assert set(fast.lora_layer_names) == expected
    before = {n: p.detach().clone() for n, p in fast.model.named_parameters(remove_duplicate=False)}
    ptrs = {n: p.data_ptr() for n, p in fast.model.named_parameters(remove_duplicate=False)}

    randomize_lora(model, seed=2)  # an "optimizer step" on every LoRA factor
    stale = logits(fast.model, IDS)
    assert (stale - logits(model, IDS)).abs().max() > 1e-1  # the copy is stale until refreshed
    fast.refresh()
    assert torch.allclose(logits(fast.model, IDS), logits(model, IDS), atol=ATOL, rtol=0)

    after = dict(fast.model.named_parameters(remove_duplicate=False))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"{n}.weight" for n in expected}
    assert all(after[n].data_ptr() == ptrs[n] for n in after)  # in place: nothing reallocated


def test_release_frees_and_rebuilds_when_not_kept():
    model = peft_policy().eval()
    fast = FastPolicy(model, keep=False)
    first = fast.refresh()
    fast.release()
    assert fast._model is None
    randomize_lora(model, seed=5)
    assert fast.refresh() is not first
    assert torch.allclose(logits(fast.model, IDS), logits(model, IDS), atol=ATOL, rtol=0)
    kept = FastPolicy(model)  # keep=True: release() keeps the copy
    m = kept.refresh()
    kept.release()
    assert kept.refresh() is m


def test_rejects_a_model_without_adapters():
    with pytest.raises(FastPolicyError, match="PeftModel"):
        FastPolicy(tiny_model())


# ---------------------------------------------------------------------------- trainer
def test_trainer_steps_identical_with_and_without_fast_rollout(tmp_path):
    import grpo

    def digit_fraction(prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    rows = [{"prompt": p} for p in PROMPTS]

    def run(fast_rollout: bool, keep: bool = True):
        # sampler_correction "none": TIS (the default with fast_rollout) weights each token by
        # pi_old / pi_copy, 1 up to the copy's rounding (~1e-6), which moved the step-1 loss
        # (~0) by 1.5e-7 and grad_norm by 6e-6 relative under other ISAs / thread counts.
        # Without it the runs are bitwise equal here; the tolerances allow only for float32 reordering.
        cfg = grpo.GRPOConfig(output_dir=str(tmp_path / f"{fast_rollout}{keep}"), num_generations=4, batch_size=8,
                              micro_batch_size=4, max_completion_length=8, max_steps=2, learning_rate=5e-2,
                              lr_scheduler="constant", beta=0.04, lora_r=4, save_steps=0, progress_bar=False,
                              log_completions_steps=0, fast_rollout=fast_rollout, fast_rollout_keep=keep,
                              sampler_correction="none", cpu_dtype="float32")
        trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_fraction], rows, cfg)
        assert (trainer.fast_policy is not None) == fast_rollout
        out = []
        for _ in range(2):  # step 2 samples from the updated (nonzero) LoRA: the merge matters
            metrics = trainer.step()
            if fast_rollout:  # freed after the rollout (not in memory during the update) unless kept
                assert (trainer.fast_policy._model is not None) == keep
            out.append((metrics, [s["completion"] for s in trainer._last_samples]))
        return out

    slow = run(False)
    for fast in (run(True), run(True, keep=False)):
        for (m_fast, texts_fast), (m_slow, texts_slow) in zip(fast, slow):
            assert texts_fast == texts_slow
            for key in ("reward", "loss", "kl", "grad_norm", "completion_length"):
                assert m_fast[key] == pytest.approx(m_slow[key], rel=1e-5, abs=1e-7), key
