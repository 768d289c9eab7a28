"""Fixed-shape decoding: a static KV cache, a fixed batch and bucketed lengths, so that the
one-token decode step can be captured once by `torch.compile(mode="reduce-overhead")`
(CUDA graphs on a GPU) and replayed at every token.

Why: on a GPU a small model's decode step is bound by kernel launches, not by FLOPs
(Qwen3-0.6B: 28 layers of norms, projections, RoPE, attention and MLP: hundreds of
small kernels per token). A CUDA graph replays the whole step as
one launch, but it needs the same shapes and the same memory addresses at every replay.
The default loop (`grpo.rollout._decode_loop`) breaks both: its cache grows and finished
rows are dropped from the batch. Here instead:

- the cache is a transformers `StaticCache` of `L` slots per row, allocated once, written
  in place (`index_copy_` at the cache's own counter), its tensors marked as static
  addresses; the compiled loop keeps it for the next rollout of the same shape;
- the batch never shrinks: a finished row keeps decoding, and what it produces after its
  EOS is ignored (`lengths` stop counting it);
- the attention mask is one [B, L] tensor for the whole rollout (the prompt's padding,
  then ones: the causal part hides the slots not written yet);
- lengths are bucketed: the prompt is left-padded to a multiple of `bucket` (Tb) and
  L = Tb + round_up(max_new_tokens, bucket), so rollouts whose prompts differ by a few
  tokens reuse the same compiled graph instead of compiling a new one;
- the host checks whether every row has stopped only every `sync_every` tokens (reading
  a GPU flag stalls the launch queue).

The prefill (variable length, run once) stays eager, on one copy of each prompt; its
cache is then repeated G times, as in the dynamic loop.

Cost: every step attends over all L slots (masked), and finished rows are not dropped.
On CPU it was no faster than the dynamic loop, compiled or not (benchmarks/RESULTS.md,
Decode loops), so "auto" picks it only on CUDA. Exactness: the same tokens as the dynamic loop under greedy decoding, and under
sampling with per-prompt seeds (`PromptStreams` draws for every row either way);
tests/test_staticgen.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

DECODE_MODES = ("auto", "dynamic", "static", "compiled")


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (n >= 0, multiple >= 1)."""
    return -(-n // multiple) * multiple


def resolve_decode(mode: str, device: torch.device, plain_model: bool) -> str:
    """The decode loop to use. "auto": "compiled" on CUDA when sampling from a plain
    transformers model (the fast copy), "static" on CUDA through a PEFT/4-bit model
    (bitsandbytes and PEFT's branches are not compiled in one graph), "dynamic" on CPU."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode
    if torch.device(device).type != "cuda":
        return "dynamic"
    return "compiled" if plain_model else "static"


def left_pad_to(input_ids: Tensor, attention_mask: Tensor, width: int, pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad [B, T] ids and mask to [B, width] (width >= T) with masked pad columns.
    Positions come from the mask (cumsum - 1), so extra padding changes no real token's
    position and, masked out of attention, no logit."""
    extra = width - input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot left-pad {input_ids.shape[1]} columns to {width}")
    if extra == 0:
        return input_ids, attention_mask
    pad_ids = input_ids.new_full((input_ids.shape[0], extra), pad_token_id)
    return torch.cat([pad_ids, input_ids], dim=1), torch.cat([attention_mask.new_zeros(pad_ids.shape), attention_mask], dim=1)


def static_cache_for(model, batch: int, slots: int, keep: bool):
    """The decode cache for [batch, slots]. With `keep` (the compiled step) it is kept on
    the model and reused by later rollouts of the same shape: a CUDA graph replays on
    fixed addresses, so a new cache per rollout would mean recording the graphs again. One
    shape is kept (bucketing makes repeats the rule); it is freed with the model (the fast
    copy's `release()`). Without `keep`, a new cache that lives for this rollout only."""
    from transformers import StaticCache

    if not keep:
        return StaticCache(config=model.config, max_cache_len=slots)
    store = model.__dict__.setdefault("_grpo_static_cache", {})  # a plain attribute, not a submodule
    if (batch, slots) not in store:
        store.clear()
        store[(batch, slots)] = StaticCache(config=model.config, max_cache_len=slots)
    return store[(batch, slots)]


def fill_static_cache(cache, prefill_cache, repeats: int) -> None:
    """Copy the prefill's [P, H, Tb, D] keys/values into slots 0..Tb-1 of the static
    cache's [P*repeats, H, L, D] tensors (prompt p -> rows p*r .. p*r+r-1), in place, and
    set the cache's write position to Tb. Slots past Tb may hold an older rollout's
    values: the causal mask hides every slot at or after the write position."""
    for layer, src in zip(cache.layers, prefill_cache.layers, strict=True):
        if getattr(layer, "is_sliding", False):
            raise ValueError("static decode does not support sliding-window attention layers; use decode='dynamic'")
        keys = src.keys.repeat_interleave(repeats, dim=0)
        values = src.values.repeat_interleave(repeats, dim=0)
        if not layer.is_initialized:  # allocates [B, H, L, D] and marks it as a static address
            layer.lazy_initialization(keys, values)
        n = keys.shape[-2]
        layer.keys[:, :, :n].copy_(keys)
        layer.values[:, :, :n].copy_(values)
        layer.cumulative_length.fill_(n)


def compiled_forward(model, backend: str = "inductor"):
    """`torch.compile` of the model for the one-token step, made once per model and
    backend and kept on it: the fast copy keeps its modules across `refresh()` (weights
    are updated in place), so the graphs stay valid between steps. mode
    "reduce-overhead" = CUDA graphs on a GPU; fullgraph=True makes a graph break an
    error instead of a silent slow path; dynamic=False: one graph per bucketed shape."""
    store = model.__dict__.setdefault("_grpo_compiled", {})
    if backend not in store:
        mode = "reduce-overhead" if backend == "inductor" else None
        store[backend] = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return store[backend]


def static_decode_loop(
    model, input_ids, attention_mask, *, max_new_tokens, eos_token_ids, select, group_size=1,
    bucket: int = 64, compiled: bool = False, backend: str = "inductor", sync_every: int | None = None,
    pad_token_id: int = 0,
):
    """Same contract as `grpo.rollout._decode_loop`: prompts [P, Tp] left-padded ->
    tokens [B, max_new_tokens] (junk past each row's length), lengths [B] long,
    stopped [B] bool; B = P * group_size. `select(logits [B, V], rows [B]) -> ids [B]`."""
    from transformers import DynamicCache

    from grpo.rollout import prefill  # rollout imports this module

    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    device = input_ids.device
    if sync_every is None:
        sync_every = 16 if device.type == "cuda" else 1
    width = round_up(input_ids.shape[1], bucket)  # Tb
    input_ids, attention_mask = left_pad_to(input_ids, attention_mask, width, pad_token_id)
    slots = width + round_up(max_new_tokens, bucket)  # L
    B = input_ids.shape[0] * group_size

    # Prefill, eager, one row per distinct prompt; then G copies into the static cache.
    prefill_cache = DynamicCache(config=model.config)
    logits, mask, next_pos = prefill(model, input_ids, attention_mask, prefill_cache)
    cache = static_cache_for(model, B, slots, keep=compiled)
    fill_static_cache(cache, prefill_cache, group_size)
    del prefill_cache
    if group_size > 1:
        logits, mask, next_pos = (x.repeat_interleave(group_size, dim=0) for x in (logits, mask, next_pos))
    full_mask = torch.cat([mask, mask.new_ones(B, slots - width)], dim=1)  # [B, L], fixed

    step = compiled_forward(model, backend) if compiled else model
    cudagraphs = compiled and backend == "inductor" and device.type == "cuda"
    rows = torch.arange(B, device=device)
    tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        tok = select(logits, rows)  # [B]
        tokens[:, t] = tok
        lengths.masked_fill_(~stopped, t + 1)
        stopped |= torch.isin(tok, eos)
        if t == max_new_tokens - 1 or ((t + 1) % sync_every == 0 and bool(stopped.all())):
            break
        if cudagraphs:  # the previous replay's outputs (logits) are consumed: let it reuse them
            torch.compiler.cudagraph_mark_step_begin()
        out = step(input_ids=tok[:, None], attention_mask=full_mask, position_ids=next_pos,
                   cache=cache, use_cache=True)
        logits = out.logits[:, -1]  # [B, V]
        next_pos = next_pos + 1
    return tokens, lengths, stopped
