"""Tests of grpo.rollout: the decode loop, token selection, prompt encoding, decoding.

Two kinds of model: the tiny random Qwen3 from grpo.testing (real attention, KV cache,
compared against HF `generate`), and a hand-made bigram model whose next-token logits
are a fixed table lookup of the last token (so stopping and decoding are scripted).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo.model import disable_cpu_4bit_packing
from grpo.rollout import (
    Rollout,
    default_eos_token_ids,
    encode_prompts,
    generate_rollout,
    inverse_cdf_sample,
    next_token_probs,
    resolve_pad_token_id,
    sample,
    select_next_token,
    top_k_filter,
    top_p_keep_mask,
)
from grpo.testing import chat_prompt, tiny_model, tiny_tokenizer

EOS, PAD, IM_START = 2, 0, 1


@pytest.fixture(scope="module")
def prompts(tok):
    # Three different lengths, so the batch is left-padded.
    return [chat_prompt(tok, "hi"), chat_prompt(tok, "what is 2+2?"), chat_prompt(tok, "a much longer question, ok?")]


def hf_greedy(model, ids, mask, max_new_tokens, eos):
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=PAD,
    )
    return out[:, ids.shape[1]:]


class BigramLM(torch.nn.Module):
    """logits of the next token = table[last token]: a scripted 'policy'. Ignores the
    cache and positions; accepts the same kwargs as an HF causal LM forward."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.calls = []  # batch size of each forward, to observe compaction

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        assert attention_mask.shape[1] >= input_ids.shape[1]
        self.calls.append(input_ids.shape[0])
        return SimpleNamespace(logits=self.table[input_ids])  # [b, t, V]


def bigram(script: dict[int, int], vocab: int = 100) -> BigramLM:
    """Greedy successor of token a is script[a] (logit 10 vs 0 elsewhere); unscripted
    tokens go to 'a'."""
    a = 4 + 0  # id of 'a' in the tiny tokenizer (first character after 4 specials)
    table = torch.zeros(vocab, vocab)
    table[:, a] = 10.0
    for src, dst in script.items():
        table[src] = 0.0
        table[src, dst] = 10.0
    return BigramLM(table)


# ---------------------------------------------------------------------------------------
# Greedy decoding against HF generate


def test_greedy_matches_hf_generate_single_and_batch(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    assert mask.sum(-1).unique().numel() == 3  # really left-padded
    # Also stop on a token the greedy path emits early, so rows stop at different steps.
    stop_tok = int(hf_greedy(model, ids, mask, 8, EOS)[1, 5])
    for eos in ([EOS], [EOS, stop_tok]):
        ref = hf_greedy(model, ids, mask, 16, eos)
        got, got_mask, truncated = sample(model, ids, mask, max_new_tokens=16, eos_token_ids=eos,
                                          pad_token_id=PAD, temperature=0)
        assert torch.equal(got, ref)
        assert torch.equal(truncated, ~torch.isin(ref, torch.tensor(eos)).any(-1))
    assert got_mask.sum(-1).unique().numel() > 1  # rows did stop at different lengths
    # A single prompt (no padding at all).
    for p in prompts:
        ids1, mask1, _ = encode_prompts(tok, [p], None)
        got1, _, _ = sample(model, ids1, mask1, max_new_tokens=12, eos_token_ids=[EOS],
                            pad_token_id=PAD, temperature=0)
        assert torch.equal(got1, hf_greedy(model, ids1, mask1, 12, EOS))


def test_left_padding_does_not_change_greedy(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    batched, bmask, _ = sample(model, ids, mask, max_new_tokens=16, eos_token_ids=[EOS],
                               pad_token_id=PAD, temperature=0)
    for i, p in enumerate(prompts):
        ids1, mask1, _ = encode_prompts(tok, [p], None)
        assert mask1.all()  # alone: no padding
        alone, _, _ = sample(model, ids1, mask1, max_new_tokens=16, eos_token_ids=[EOS],
                             pad_token_id=PAD, temperature=0)
        n = int(bmask[i].sum())
        assert torch.equal(alone[0, :n], batched[i, :n])


def test_compaction_is_exact(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    ref = hf_greedy(model, ids, mask, 20, EOS)
    stop_tok = int(ref[0, 3])
    outs = [sample(model, ids, mask, max_new_tokens=20, eos_token_ids=[stop_tok],
                   pad_token_id=PAD, temperature=0, compact=c) for c in (True, False)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_top_k_one_equals_greedy(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    greedy = sample(model, ids, mask, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=PAD,
                    temperature=0)
    g = torch.Generator().manual_seed(3)
    top1 = sample(model, ids, mask, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=PAD,
                  temperature=1.5, top_k=1, generator=g)
    assert torch.equal(greedy[0], top1[0])


# ---------------------------------------------------------------------------------------
# Seeds, limits, stopping


def _sampled(model, ids, mask, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    args = dict(max_new_tokens=10, eos_token_ids=[EOS], pad_token_id=PAD, temperature=1.0)
    return sample(model, ids, mask, generator=g, **{**args, **kw})[0]


def test_seeds_reproduce_and_differ(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    a = _sampled(model, ids, mask, seed=0)
    torch.manual_seed(123)  # the global RNG must not matter
    torch.rand(7)
    b = _sampled(model, ids, mask, seed=0)
    c = _sampled(model, ids, mask, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_prompt_seeds_make_a_prompt_independent_of_its_batch(model, tok, prompts):
    # With one stream per prompt, prompt 2's completions are the same whether it is
    # sampled alone, after the other two, or in another order (the data-parallel split).
    args = dict(group_size=3, max_prompt_length=None, max_new_tokens=8, temperature=1.0,
                top_p=1.0, top_k=0, generator=None)
    together = generate_rollout(model, tok, prompts, prompt_seeds=[10, 11, 12], **args)
    alone = generate_rollout(model, tok, prompts[2:], prompt_seeds=[12], **args)
    swapped = generate_rollout(model, tok, [prompts[2], prompts[0]], prompt_seeds=[12, 10], **args)
    assert together.completion_texts[6:] == alone.completion_texts == swapped.completion_texts[:3]
    assert together.completion_texts[:3] == swapped.completion_texts[3:]
    assert len(set(together.completion_texts[6:])) > 1  # the G rows of a prompt differ
    other = generate_rollout(model, tok, prompts[2:], prompt_seeds=[13], **args)
    assert other.completion_texts != alone.completion_texts
    with pytest.raises(ValueError, match="prompt_seeds has 1 seeds for 3 prompts"):
        generate_rollout(model, tok, prompts, prompt_seeds=[1], **args)


def test_inverse_cdf_sample_hand_worked():
    # cdf of [0.2, 0, 0.8] = [0.2, 0.2, 1.0]: u < 0.2 -> 0; u >= 0.2 -> 2 (never the empty 1).
    probs = torch.tensor([[0.2, 0.0, 0.8]]).expand(4, -1)
    u = torch.tensor([0.0, 0.1, 0.2, 0.999999])
    assert inverse_cdf_sample(probs, u).tolist() == [0, 0, 2, 2]
    # Unnormalized rows are scaled by their total: [1, 3] -> cdf [1, 4]; u 0.3 -> 1.2 -> 1.
    assert inverse_cdf_sample(torch.tensor([[1.0, 3.0]]), torch.tensor([0.3])).tolist() == [1]


def test_temperature_zero_is_deterministic(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    a = _sampled(model, ids, mask, seed=0, temperature=0)
    b = _sampled(model, ids, mask, seed=1, temperature=0)
    assert torch.equal(a, b)


def test_max_new_tokens_respected_and_truncated(model, tok, prompts):
    ids, mask, _ = encode_prompts(tok, prompts, None)
    out, cmask, truncated = sample(model, ids, mask, max_new_tokens=7, eos_token_ids=[EOS],
                                   pad_token_id=PAD, temperature=0)
    # The greedy tiny model does not emit EOS within 7 tokens: all rows hit the limit.
    assert out.shape == (3, 7) and cmask.all() and truncated.all()


def test_eos_stops_row_and_mask_ends_after_eos():
    # Row 0 prompt ends in 'x': x -> y -> EOS. Row 1 ends in 'b': b -> b -> b ... (no EOS).
    x, y, b = 4 + 23, 4 + 24, 4 + 1
    lm = bigram({x: y, y: EOS, b: b})
    ids = torch.tensor([[PAD, x], [b, b]])
    mask = torch.tensor([[0, 1], [1, 1]])
    out, cmask, truncated = sample(lm, ids, mask, max_new_tokens=5, eos_token_ids=[EOS],
                                   pad_token_id=PAD, temperature=0)
    assert out.tolist() == [[y, EOS, PAD, PAD, PAD], [b, b, b, b, b]]
    assert cmask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]
    # Compaction: prefill with 2 rows, step 1 with 2 rows, then row 0 is dropped.
    assert lm.calls == [2, 2, 1, 1, 1]


def test_all_rows_stop_early_and_t_is_longest():
    x = 4 + 23
    lm = bigram({x: EOS})
    ids = torch.tensor([[x], [x]])
    out, cmask, truncated = sample(lm, ids, torch.ones_like(ids), max_new_tokens=50,
                                   eos_token_ids=[7, EOS], pad_token_id=PAD, temperature=0)
    assert out.tolist() == [[EOS], [EOS]]  # T = longest produced = 1, not 50
    assert not truncated.any() and len(lm.calls) == 1  # only the prefill ran


def test_ignore_eos_gives_exactly_max_new_tokens():
    x = 4 + 23
    lm = bigram({x: EOS, EOS: x})
    ids = torch.tensor([[x]])
    out, cmask, truncated = sample(lm, ids, torch.ones_like(ids), max_new_tokens=4,
                                   eos_token_ids=[EOS], pad_token_id=PAD, temperature=0,
                                   ignore_eos=True)
    assert out.tolist() == [[EOS, x, EOS, x]] and cmask.all() and truncated.all()


def test_sampling_restores_train_mode_and_uses_eval():
    lm = bigram({})
    lm.train()
    seen = []
    lm.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    sample(lm, torch.tensor([[5]]), torch.tensor([[1]]), max_new_tokens=2, eos_token_ids=[EOS],
           pad_token_id=PAD, temperature=0)
    assert seen == [False, False] and lm.training


def test_bad_inputs_raise(model):
    ids, mask = torch.tensor([[5, 6]]), torch.tensor([[1, 0]])
    kw = dict(max_new_tokens=3, eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(ValueError, match="LEFT-padded"):
        sample(model, ids, mask, **kw)
    ok = torch.ones_like(ids)
    for bad, match in [({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                       ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            sample(model, ids, ok, **{**kw, **bad})


# ---------------------------------------------------------------------------------------
# Token selection in isolation


def test_top_p_keeps_smallest_nucleus():
    # mass ranked above each token: [0, 0.5, 0.8, 0.95]; keep while < 0.8 -> first two.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_keep_mask(probs, 0.8).tolist() == [[True, True, False, False]]
    # Unsorted input, top_p 0.85: sorted [0.5, 0.3, 0.15, 0.05], mass above 0.8 < 0.85 ->
    # the 0.15 token is kept too.
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5]])
    assert top_p_keep_mask(probs, 0.85).tolist() == [[False, True, True, True]]
    # A tiny top_p keeps only the argmax.
    assert top_p_keep_mask(probs, 1e-6).tolist() == [[False, False, False, True]]


def test_top_k_filter_and_combined_probs():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all()
    assert torch.equal(top_k_filter(logits, 0), logits)
    # top_p 0.8 keeps {0.5, 0.3}, renormalized: [0.5/0.8, 0.3/0.8] = [0.625, 0.375].
    p = next_token_probs(logits, temperature=1.0, top_k=0, top_p=0.8)
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_k 3 first -> [0.5, 0.3, 0.15] / 0.95; then top_p 0.9: mass above 3rd = 0.8/0.95
    # = 0.842 < 0.9 -> all three kept.
    p = next_token_probs(logits, temperature=1.0, top_k=3, top_p=0.9)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    # Temperature 0.5 squares the probabilities before normalizing:
    # [0.25, 0.09, 0.0225, 0.0025] / 0.365.
    p = next_token_probs(logits, temperature=0.5, top_k=0, top_p=1.0)
    torch.testing.assert_close(p, torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.365)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 3, 0.9)])
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = select_next_token(logits.expand(n, -1), temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / n
    # Reference computed independently: softmax(logits / T), then the filters by hand.
    ref = torch.softmax(logits / temperature, -1)
    if top_k:
        ref[top_k:] = 0  # logits are sorted, so top-k = the first k
        ref = ref / ref.sum()
    if top_p < 1:
        cum = torch.cumsum(ref, 0) - ref
        ref = torch.where(cum < top_p, ref, torch.zeros_like(ref))
        ref = ref / ref.sum()
    # Binomial std <= sqrt(0.25 / 40000) = 0.0025; 0.01 is 4 sigma.
    torch.testing.assert_close(freq, ref, atol=0.01, rtol=0)
    assert (freq[ref == 0] == 0).all()


# ---------------------------------------------------------------------------------------
# Prompt encoding and decoding


def test_encode_prompts_left_pads_without_adding_specials(tok):
    ids, mask, n = encode_prompts(tok, ["ab", "abcd"], None)
    a, b, c, d = (tok.convert_tokens_to_ids(ch) for ch in "abcd")
    assert ids.tolist() == [[PAD, PAD, a, b], [a, b, c, d]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]] and n == 0


def test_encode_prompts_left_truncates_and_warns(tok):
    with pytest.warns(UserWarning, match=r"1 of 2 prompts.*max_prompt_length=3"):
        ids, mask, n = encode_prompts(tok, ["abcdef", "xy"], 3)
    d, e, f = (tok.convert_tokens_to_ids(ch) for ch in "def")
    assert ids[0].tolist() == [d, e, f] and n == 1  # the end is kept
    assert mask[1].tolist() == [0, 1, 1]


def test_pad_falls_back_to_eos_and_errors_without_either():
    tok = tiny_tokenizer(pad_token=False)
    assert resolve_pad_token_id(tok) == EOS
    ids, _, _ = encode_prompts(tok, ["a", "abc"], None)
    assert ids[0, 0] == EOS
    bare = SimpleNamespace(pad_token_id=None, eos_token_id=None, name_or_path="my/tok")
    with pytest.raises(ValueError, match="my/tok"):
        resolve_pad_token_id(bare)


def test_encode_prompts_rejects_empty(tok):
    with pytest.raises(ValueError, match="zero tokens"):
        encode_prompts(tok, ["ab", ""], None)
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(tok, [], None)


def test_rollout_texts_keep_emitted_special_tokens_but_not_stop_eos(tok):
    # Prompt ends in '\n' (generation prompt). Script: '\n' -> <|im_start|> -> 'a' -> 'b' -> EOS.
    nl, a, b = (tok.convert_tokens_to_ids(ch) for ch in "\nab")
    lm = bigram({nl: IM_START, IM_START: a, a: b, b: EOS})
    r = generate_rollout(lm, tok, [chat_prompt(tok, "q")], group_size=2, max_prompt_length=None,
                         max_new_tokens=10, temperature=0, top_p=1.0, top_k=0, generator=None,
                         eos_token_ids=[EOS])
    assert r.completion_ids[0].tolist() == [IM_START, a, b, EOS]
    assert r.completion_texts == ["<|im_start|>ab", "<|im_start|>ab"]
    # Truncated rows keep all their tokens (no EOS to cut): limit 2 -> "<|im_start|>a".
    r = generate_rollout(lm, tok, [chat_prompt(tok, "q")], group_size=1, max_prompt_length=None,
                         max_new_tokens=2, temperature=0, top_p=1.0, top_k=0, generator=None,
                         eos_token_ids=[EOS])
    assert r.truncated.tolist() == [True] and r.completion_texts == ["<|im_start|>a"]


def test_generate_rollout_groups_and_fields(model, tok, prompts):
    g = torch.Generator().manual_seed(0)
    r = generate_rollout(model, tok, prompts[:2], group_size=3, max_prompt_length=None,
                         max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50, generator=g)
    assert isinstance(r, Rollout) and r.group_size == 3
    assert r.prompt_indices.tolist() == [0, 0, 0, 1, 1, 1]
    ids, mask, _ = encode_prompts(tok, prompts[:2], None)
    assert torch.equal(r.prompt_ids, ids.repeat_interleave(3, 0))
    assert torch.equal(r.prompt_mask, mask.repeat_interleave(3, 0))
    assert r.completion_ids.shape == r.completion_mask.shape == (6, r.completion_ids.shape[1])
    assert torch.equal(r.completion_lengths, r.completion_mask.sum(-1))
    assert r.num_tokens == int(r.completion_mask.sum())
    assert len(r.completion_texts) == 6 and len(set(r.completion_texts[:3])) > 1  # sampled
    moved = r.to("cpu")
    assert torch.equal(moved.completion_ids, r.completion_ids)
    assert moved.completion_texts == r.completion_texts


def test_default_eos_ids_merge_and_dedupe(tok):
    m = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[EOS, 7, EOS]))
    assert default_eos_token_ids(m, tok) == [EOS, 7]
    m = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))
    assert default_eos_token_ids(m, tok) == [EOS, 9]
    assert default_eos_token_ids(SimpleNamespace(), tok) == [EOS]


# ---------------------------------------------------------------------------------------
# PEFT


def test_peft_lora_model_greedy_matches_generate(tok, prompts):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        tiny_model(),
        peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.5,
                        init_lora_weights=False),  # random B: the adapter changes outputs
    )
    ids, mask, _ = encode_prompts(tok, prompts, None)
    lora.eval()
    ref = hf_greedy(lora, ids, mask, 10, EOS)
    with lora.disable_adapter():
        base = hf_greedy(lora, ids, mask, 10, EOS)
    assert not torch.equal(ref, base)  # the adapter is really in the path
    lora.train()  # sample() must switch dropout off and restore train mode
    got, _, _ = sample(lora, ids, mask, max_new_tokens=10, eos_token_ids=[EOS], pad_token_id=PAD,
                       temperature=0)
    assert torch.equal(got, ref)
    assert lora.training and all(m.training for m in lora.modules())


def test_4bit_lora_model_greedy_matches_generate(tok, prompts, tmp_path):
    """Same code path on a bitsandbytes NF4 base + LoRA (4-bit works on CPU)."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                device_map="cpu")
    disable_cpu_4bit_packing(base)  # the trainer's float32 path, also on an AVX512-BF16 CPU
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    ids, mask, _ = encode_prompts(tok, prompts[:2], None)
    got, _, _ = sample(lora, ids, mask, max_new_tokens=6, eos_token_ids=[EOS], pad_token_id=PAD,
                       temperature=0)
    assert torch.equal(got, hf_greedy(lora, ids, mask, 6, EOS))


def test_reserved_cache_equals_dynamic_cache_and_never_reallocates():
    """The cache the sampler uses writes into one buffer with room for the completion; its
    keys/values match transformers' concatenating DynamicCache through prefill, repeat,
    selection and decode, and the buffer is not reallocated by a decode step."""
    from grpo.rollout import _new_cache

    model = tiny_model()
    ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    caches = {name: _new_cache(model, reserve) for name, reserve in (("dynamic", 0), ("reserved", 4))}
    assert type(caches["reserved"].layers[0]).__name__ == "ReservedLayer"
    with torch.no_grad():
        for cache in caches.values():
            model(input_ids=ids, cache=cache, use_cache=True)
            cache.batch_repeat_interleave(2)  # [2, ...] -> [4, ...]
            cache.batch_select_indices(torch.tensor([0, 2, 3]))
        buffer = caches["reserved"].layers[0]._k.data_ptr()
        for t in range(3):
            tok = torch.tensor([[7 + t]] * 3)
            for cache in caches.values():
                model(input_ids=tok, cache=cache, use_cache=True)
    assert caches["reserved"].layers[0]._k.data_ptr() == buffer  # written in place
    assert caches["reserved"].get_seq_length() == caches["dynamic"].get_seq_length() == 8
    for a, b in zip(caches["dynamic"].layers, caches["reserved"].layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
