"""Tests of grpo.staticgen: the fixed-shape decode loop (static KV cache, fixed batch,
bucketed lengths, the compiled step) against the dynamic loop of grpo.rollout.

The dynamic loop is itself tested against HF `generate` (tests/test_rollout.py), so equal
tokens here mean equal to `generate` under greedy decoding. Rows are made to stop at
different steps by taking as "EOS" tokens the dynamic loop emits mid-completion.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo import staticgen
from grpo.fastgen import FastPolicy
from grpo.logprobs import compile_status
from grpo.model import disable_cpu_4bit_packing
from grpo.rollout import _is_plain, encode_prompts, generate_rollout, sample
from grpo.staticgen import fill_static_cache, left_pad_to, resolve_decode, round_up, static_decode_loop
from grpo.testing import chat_prompt, tiny_gpt2, tiny_model, tiny_tokenizer

PAD = 0


@pytest.fixture(scope="module")
def batch(tok):
    texts = [chat_prompt(tok, "hi"), chat_prompt(tok, "what is 2+2?"), chat_prompt(tok, "a much longer question, ok?")]
    ids, mask, _ = encode_prompts(tok, texts, None)
    return ids, mask


def stop_tokens(model, ids, mask, n=24):
    """A token the dynamic greedy loop emits mid-way in row 0 but never in the last row, so
    that rows stop at different steps and one runs to the length limit."""
    out, _, _ = sample(model, ids, mask, max_new_tokens=n, eos_token_ids=[], pad_token_id=PAD, temperature=0)
    never_last = [int(t) for t in out[0, 2:] if int(t) not in out[-1].tolist()]
    assert never_last, "the fixture's rows emit the same tokens; pick other prompts"
    return never_last[:1]


def greedy(logits, rows):
    """The `select` of a greedy loop, for calling `static_decode_loop` directly."""
    return logits.argmax(-1)


def run(model, ids, mask, decode, **kw):
    args = dict(max_new_tokens=24, pad_token_id=PAD, temperature=0, bucket=16)
    return sample(model, ids, mask, decode=decode, **{**args, **kw})


def assert_same(a, b):
    for x, y, name in zip(a, b, ("completion_ids", "completion_mask", "truncated")):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------------------
# Small pure pieces


def test_round_up_hand_worked():
    assert [round_up(n, 64) for n in (0, 1, 63, 64, 65, 200)] == [0, 64, 64, 64, 128, 256]
    assert round_up(7, 1) == 7


def test_left_pad_to_adds_masked_columns_and_keeps_positions():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    pids, pmask = left_pad_to(ids, mask, 5, pad_token_id=0)
    assert pids.tolist() == [[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]]
    assert pmask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert ((pmask.cumsum(-1) - 1).clamp(min=0)[:, -1] == (mask.cumsum(-1) - 1)[:, -1]).all()
    with pytest.raises(ValueError, match="cannot left-pad 3 columns to 2"):
        left_pad_to(ids, mask, 2)


def test_resolve_decode():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decode("auto", cpu, plain_model=True) == "dynamic"
    assert resolve_decode("auto", cuda, plain_model=True) == "compiled"
    assert resolve_decode("auto", cuda, plain_model=False) == "static"
    assert resolve_decode("static", cpu, plain_model=False) == "static"
    with pytest.raises(ValueError, match="decode must be one of auto, dynamic, static, compiled; got 'fast'"):
        resolve_decode("fast", cpu, plain_model=True)


def test_sliding_window_layers_are_refused():
    sliding = SimpleNamespace(is_sliding=True)
    with pytest.raises(ValueError, match="sliding-window"):
        fill_static_cache(SimpleNamespace(layers=[sliding]), SimpleNamespace(layers=[None]), 1)


# ---------------------------------------------------------------------------------------
# Same tokens as the dynamic loop


@pytest.mark.parametrize("group_size", [1, 3])
def test_static_greedy_equals_dynamic(model, batch, group_size):
    ids, mask = batch
    eos = stop_tokens(model, ids, mask)
    dynamic = run(model, ids, mask, "dynamic", eos_token_ids=eos, group_size=group_size)
    static = run(model, ids, mask, "static", eos_token_ids=eos, group_size=group_size)
    assert_same(static, dynamic)
    lengths = dynamic[1].sum(-1)
    assert lengths[0] < 24 and bool(dynamic[2][-1]) and lengths[-1] == 24  # row 0 stops, the last runs on


def test_static_sampling_with_prompt_seeds_equals_dynamic(model, batch):
    """Per-prompt streams draw for every row, finished or not, so the fixed batch and the
    shrinking one consume the same uniforms."""
    ids, mask = batch
    eos = stop_tokens(model, ids, mask)
    kw = dict(eos_token_ids=eos, group_size=4, temperature=1.0, top_p=0.9, prompt_seeds=[3, 4, 5])
    dynamic = run(model, ids, mask, "dynamic", **kw)
    assert_same(run(model, ids, mask, "static", **kw), dynamic)
    assert len({tuple(r) for r in dynamic[0][:4].tolist()}) > 1  # the rows of a group differ


@pytest.mark.parametrize("bucket", [1, 5, 64])
def test_bucket_size_does_not_change_tokens(batch, bucket):
    model = tiny_gpt2()
    ids, mask = batch
    eos = stop_tokens(model, ids, mask)
    ref = run(model, ids, mask, "dynamic", eos_token_ids=eos)
    assert_same(run(model, ids, mask, "static", eos_token_ids=eos, bucket=bucket), ref)


def test_ignore_eos_gives_every_row_max_new_tokens(batch):
    model = tiny_model()
    ids, mask = batch
    out = run(model, ids, mask, "static", eos_token_ids=stop_tokens(model, ids, mask), ignore_eos=True)
    assert out[0].shape == (3, 24) and bool(out[1].all()) and bool(out[2].all())


def test_checking_for_stops_every_few_tokens_changes_nothing(batch):
    """On CUDA the host reads the all-stopped flag every 16 tokens only; the extra steps
    after the last row stopped must not change any row's tokens, length or stop flag."""
    model = tiny_model()
    ids, mask = batch
    out, _, _ = sample(model, ids, mask, max_new_tokens=24, eos_token_ids=[], pad_token_id=PAD, temperature=0)
    eos = sorted({int(out[r, 3 + 2 * r]) for r in range(3)})  # every row stops early, at different steps
    kw = dict(max_new_tokens=24, eos_token_ids=eos, bucket=16, select=greedy)
    with torch.no_grad():
        every, every5 = (static_decode_loop(model, ids, mask, sync_every=k, **kw) for k in (1, 5))
    lengths = every[1]
    assert bool(every[2].all()) and int(lengths.max()) < 24 and len(set(lengths.tolist())) > 1
    assert torch.equal(every5[1], lengths) and torch.equal(every5[2], every[2])
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(every5[0][row, :n], every[0][row, :n])


def test_compiled_loop_reuses_its_cache_and_hides_stale_slots(tok):
    """The compiled loop's second rollout of the same bucketed shape writes into the same
    cache tensors (the addresses a CUDA graph replays on), and the first rollout's values
    left in the slots past the new prompt do not leak into it. The static loop (not
    compiled) keeps no cache on the model: it would hold memory through the update."""
    model = tiny_model()
    long_ids, long_mask, _ = encode_prompts(tok, [chat_prompt(tok, "a long prompt with many words in it")] * 2, None)
    short_ids, short_mask, _ = encode_prompts(tok, [chat_prompt(tok, "hi"), chat_prompt(tok, "yo")], None)
    assert round_up(long_ids.shape[1], 64) == round_up(short_ids.shape[1], 64)  # one bucket
    kw = dict(max_new_tokens=24, eos_token_ids=[], bucket=64, select=greedy)

    def compiled(m, ids, mask):
        with torch.no_grad():
            return static_decode_loop(m, ids, mask, compiled=True, backend="eager", **kw)[0]

    with torch.no_grad():
        static_decode_loop(model, long_ids, long_mask, **kw)
    assert "_grpo_static_cache" not in model.__dict__
    compiled(model, long_ids, long_mask)
    (cache,) = model.__dict__["_grpo_static_cache"].values()
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    got = compiled(model, short_ids, short_mask)
    (again,) = model.__dict__["_grpo_static_cache"].values()
    assert again is cache and [layer.keys.data_ptr() for layer in cache.layers] == pointers
    assert torch.equal(got, compiled(tiny_model(), short_ids, short_mask))  # a fresh cache
    dynamic = run(model, short_ids, short_mask, "dynamic", eos_token_ids=[])[0]
    assert torch.equal(got, dynamic)


def test_peft_4bit_model_static_equals_dynamic(batch, tmp_path):
    """The path "auto" takes on CUDA for a PEFT policy: static, not compiled."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    disable_cpu_4bit_packing(base)  # the trainer's float32 path, also on an AVX512-BF16 CPU
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False))
    assert not _is_plain(base) and not _is_plain(lora) and _is_plain(FastPolicy(lora).model)  # what "auto" reads
    ids, mask = batch
    eos = stop_tokens(lora, ids, mask, n=12)
    kw = dict(eos_token_ids=eos, max_new_tokens=12, group_size=2)
    assert_same(run(lora, ids, mask, "static", **kw), run(lora, ids, mask, "dynamic", **kw))


# ---------------------------------------------------------------------------------------
# The compiled step


def counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def test_compiled_step_is_one_graph_per_bucket_and_exact(tok):
    """fullgraph=True: a graph break would raise. Prompts of 11 and 13 columns share the
    16-bucket (one graph); 17 columns is a new bucket (a second graph)."""
    model = tiny_model()
    backend, graphs = counting_backend()
    torch._dynamo.reset()

    def loop(width, seed):
        ids = torch.randint(3, 100, (2, width), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        kw = dict(max_new_tokens=6, eos_token_ids=[], group_size=2, select=greedy)
        with torch.no_grad():
            compiled = static_decode_loop(model, ids, mask, bucket=16, compiled=True, backend=backend, **kw)
            eager = static_decode_loop(model, ids, mask, bucket=16, **kw)
        assert torch.equal(compiled[0], eager[0])

    loop(11, 0)
    loop(13, 1)
    assert len(graphs) == 1
    loop(17, 2)
    assert len(graphs) == 2


@pytest.mark.skipif(compile_status() is not None, reason=str(compile_status()))  # inductor needs a C++ build here
def test_compiled_fast_copy_follows_refresh(tok):
    """The compiled step (inductor, the real backend) reads the fast copy's weights, which
    `refresh()` rewrites in place after an update: the compiled graph must see the new
    weights, not constants captured at compile time."""
    peft = pytest.importorskip("peft")

    lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    fast = FastPolicy(lora)
    texts = [chat_prompt(tok, "hi"), chat_prompt(tok, "what is 2+2?")]
    kw = dict(group_size=2, max_prompt_length=None, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0,
              generator=None, prompt_seeds=[1, 2], bucket=16)
    before = generate_rollout(fast.refresh(), tok, texts, decode="compiled", **kw)
    assert before.completion_texts == generate_rollout(fast.model, tok, texts, decode="dynamic", **kw).completion_texts
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    after = generate_rollout(fast.refresh(), tok, texts, decode="compiled", **kw)
    assert after.completion_texts == generate_rollout(lora, tok, texts, decode="dynamic", **kw).completion_texts
    assert after.completion_texts != before.completion_texts
    assert staticgen.compiled_forward(fast.model) is staticgen.compiled_forward(fast.model)  # compiled once


# ---------------------------------------------------------------------------------------
# In the trainer


def test_trainer_steps_identical_with_static_decode(tmp_path, tok):
    """`rollout_decode` changes how the completions are computed, never which: two steps
    (the second from the updated LoRA, through the fast copy) give the same completions
    and the same loss with the dynamic and the static loop."""
    import grpo

    def digit_fraction(prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    rows = [{"prompt": chat_prompt(tok, q)} for q in ("2+2?", "what is 3*7?", "hi", "count to 5")]

    def run(decode: str):
        # sampler_correction "none": TIS would weight tokens by pi_old / pi_sampler, and the two
        # loops' log-probs differ by rounding, which moved the step-1 loss (~0) by up to 7.5e-8
        # (limit 1e-7) with one thread. Without it the two runs are bitwise equal (measured).
        cfg = grpo.GRPOConfig(output_dir=str(tmp_path / decode), num_generations=4, batch_size=8, micro_batch_size=4,
                              max_completion_length=12, max_steps=2, learning_rate=5e-2, lr_scheduler="constant",
                              lora_r=4, save_steps=0, progress_bar=False, log_completions_steps=0,
                              rollout_decode=decode, rollout_bucket=8, sampler_correction="none",
                              cpu_dtype="float32")
        trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_fraction], rows, cfg)
        out = []
        for _ in range(2):
            metrics = trainer.step()
            out.append((metrics, [s["completion"] for s in trainer._last_samples]))
        return out

    for (m_static, texts_static), (m_dyn, texts_dyn) in zip(run("static"), run("dynamic")):
        assert texts_static == texts_dyn
        for key in ("reward", "loss", "grad_norm", "completion_length"):
            assert m_static[key] == pytest.approx(m_dyn[key], rel=1e-5, abs=1e-7), key
