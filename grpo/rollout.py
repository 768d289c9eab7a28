"""Grouped sampling: P prompts x G completions -> `Rollout`.

Our own decode loop over the model's forward with a KV cache (no `model.generate`), so
that the sampling rule (temperature, top-k, top-p), the stopping rule and the random
stream are ours, explicit and tested:

- prompts are LEFT-padded, so every row's next token sits in the last column; position
  ids come from the attention mask (cumsum - 1), the way HF `generate` computes them, so
  greedy decoding matches `model.generate(do_sample=False)` token for token;
- a row stops at its first EOS (the EOS is kept in `completion_ids` and counted in
  `completion_mask`: the policy chose to stop, and that choice gets a log-prob and a
  gradient); finished rows are dropped from the batch and the KV cache;
- sampling is inverse-CDF with one uniform per row and token, drawn from a seeded
  generator, or from one generator PER PROMPT (`prompt_seeds`): then a prompt's
  completions do not depend on which other prompts share its batch, so they are the same
  whatever the generation batch size or the number of data-parallel ranks.

What the reward sees: `completion_texts` are decoded WITHOUT the stopping EOS but WITH
every other special token the policy emitted (`skip_special_tokens=False`). Decoding
with `skip_special_tokens=True` would hide them, and a reward on the text could then be
gamed by emitting special tokens (DESIGN.md, "Notes from experience").
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from grpo import staticgen


@dataclass
class Rollout:
    """G completions for each of P prompts; B = P * G rows, row i from prompt i // G."""

    prompt_ids: Tensor  # [B, Tp] long, left-padded with the pad id
    prompt_mask: Tensor  # [B, Tp] long, 1 = real prompt token
    completion_ids: Tensor  # [B, T] long, right-padded with the pad id; includes the EOS if emitted
    completion_mask: Tensor  # [B, T] long, 1 = real completion token (EOS included)
    truncated: Tensor  # [B] bool, True = no EOS within max_new_tokens
    completion_texts: list[str]  # B strings, without the stopping EOS, other specials kept
    prompt_indices: Tensor  # [B] long, prompt of each row: i // group_size
    group_size: int  # G
    sampler_logp: Tensor | None = None  # [B, T] float32, log-prob of each token under the sampler, 0 at padding

    @property
    def completion_lengths(self) -> Tensor:
        """[B] long: number of completion tokens per row (EOS included)."""
        return self.completion_mask.sum(-1)

    @property
    def num_tokens(self) -> int:
        """Total number of completion tokens in the rollout."""
        return int(self.completion_mask.sum())

    def to(self, device: torch.device | str) -> "Rollout":
        """A copy with every tensor field on `device` (texts and group size shared)."""
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Rollout(**moved)


# ---------------------------------------------------------------------------------------
# Prompt encoding


def resolve_pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id; falls back to its eos id (pad = eos), as HF does for
    decoder-only models. Pad positions are masked out, so the choice only affects ids."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(
        f"tokenizer {name!r} has neither a pad token nor an eos token to pad with; "
        "set tokenizer.pad_token before sampling"
    )


def encode_prompts(
    tokenizer, prompt_texts: list[str], max_prompt_length: int | None
) -> tuple[Tensor, Tensor, int]:
    """Tokenize chat-templated prompts, left-truncate, left-pad.

    The texts already hold their special tokens (the chat template wrote them), so none
    are added again. A prompt longer than `max_prompt_length` keeps its LAST tokens: the
    end holds the generation prompt (`<|im_start|>assistant\\n`) that the policy needs.

    Returns (ids [B, Tp] long, mask [B, Tp] long, number of prompts truncated).
    """
    if not prompt_texts:
        raise ValueError("prompt_texts is empty: need at least one prompt")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    pad_id = resolve_pad_token_id(tokenizer)
    encoded = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
    if empty:
        raise ValueError(f"prompts at indices {empty} encode to zero tokens")

    num_truncated = 0
    if max_prompt_length is not None:
        num_truncated = sum(len(ids) > max_prompt_length for ids in encoded)
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    if num_truncated:
        warnings.warn(
            f"{num_truncated} of {len(encoded)} prompts are longer than "
            f"max_prompt_length={max_prompt_length} tokens; kept their last tokens",
            stacklevel=2,
        )

    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask, num_truncated


# ---------------------------------------------------------------------------------------
# Token selection (pure functions of logits)


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Set all but the `top_k` largest logits of each row to -inf (0 = no filtering).

    logits: [b, V]. Ties with the k-th value are kept (as HF's TopKLogitsWarper does).
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_keep_mask(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus of each row (Holtzman et al. 2020, "The Curious Case of Neural Text
    Degeneration", sec. 3.1): the smallest set of most likely tokens whose total
    probability reaches `top_p`.

    probs: [b, V] -> bool [b, V], True = keep. A token is kept when the mass of the tokens
    ranked strictly above it is < top_p, so the most likely token is always kept.
    Example: probs [0.5, 0.3, 0.15, 0.05], top_p 0.8: mass above = [0, 0.5, 0.8, 0.95]
    -> keep the first two.
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_probs, dim=-1)  # [b, V]
    mass_above = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # exclusive
    keep_sorted = mass_above < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def next_token_probs(logits: Tensor, *, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Sampling distribution [b, V] (float32) from logits [b, V]: temperature, then top-k,
    then top-p on the tempered distribution (the order of HF's logits warpers)."""
    logits = top_k_filter(logits.float() / temperature, top_k)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = probs * top_p_keep_mask(probs, top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def inverse_cdf_sample(probs: Tensor, u: Tensor) -> Tensor:
    """Categorical draws by inversion: probs [b, V], u [b] uniform in [0, 1) -> ids [b] long.

    Token i is chosen when u * total lies in [cdf[i-1], cdf[i]); `right=True` never lands
    on a zero-probability token (its cdf step is empty). Example: probs [0.2, 0, 0.8],
    u 0.1 -> 0, u 0.2 -> 2, u 0.9 -> 2.
    """
    cdf = probs.cumsum(-1)  # [b, V]
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]  # [b, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    u: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One token per row and its log-probability under the distribution it was drawn from:
    logits [b, V] -> (ids [b] long, logp [b] float32). temperature 0 = greedy (argmax, logp 0:
    a point mass). `u` [b]: the rows' uniforms; drawn from `generator` when not given.

    The log-prob is that of the distribution actually sampled: softmax(logits / temperature),
    then renormalized over the top-k / top-p survivors. Without top-k and top-p it is the
    learner's tempered log-prob of the same logits; with them it is larger by -log(kept mass),
    so a learner / sampler ratio also counts the truncation (it is <= 1 on kept tokens)."""
    if temperature == 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)  # [b, V]
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    ids = inverse_cdf_sample(probs, u)
    # A drawn token has probability > 0 (inverse_cdf_sample never lands on a zero), and float32
    # keeps the relative precision of small probabilities, so the log is exact to ~1e-7.
    return ids, probs.gather(-1, ids[:, None]).squeeze(-1).log()


def select_next_token(logits: Tensor, **kwargs) -> Tensor:
    """`sample_next_token` without the log-prob: ids [b] long."""
    return sample_next_token(logits, **kwargs)[0]


class PromptStreams:
    """One seeded generator per prompt; at every decode step each prompt draws G uniforms,
    one per completion row (finished rows too), so row p*G+g's t-th uniform depends only
    on (seeds[p], t, g): never on the other prompts in the batch."""

    def __init__(self, seeds: list[int], group_size: int, device: torch.device):
        self.group_size, self.device = group_size, device
        self.generators = [torch.Generator(device).manual_seed(int(s) % (2**63)) for s in seeds]

    def uniforms(self, rows: Tensor) -> Tensor:
        """[b] uniforms for the original row indices `rows` [b] still in the batch."""
        draws = torch.stack([torch.rand(self.group_size, generator=g, device=self.device)
                             for g in self.generators])  # [P, G]
        return draws.flatten()[rows]


def _check_sampling_args(max_new_tokens: int, temperature: float, top_p: float, top_k: int):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


# ---------------------------------------------------------------------------------------
# Decode loop


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode (LoRA dropout off) for the block; restores each module's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _accepts_logits_to_keep(model) -> bool:
    """Whether the (possibly PEFT-wrapped) causal LM's forward takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _is_plain(model) -> bool:
    """A transformers model with neither PEFT layers nor a bitsandbytes-quantized base."""
    return not hasattr(model, "peft_config") and getattr(model, "hf_quantizer", None) is None


def _new_cache(model, reserve: int = 0):
    """A DynamicCache whose full-attention layers keep room for `reserve` more tokens
    (`ReservedLayer`); other layer kinds (sliding windows) stay as transformers makes them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if reserve > 0 and cache.layers:
        cache.layers = [_reserved_layer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _reserved_layer(reserve: int):
    """A transformers DynamicLayer that writes each new token's keys/values into a buffer
    allocated once with room for `reserve` tokens after the prompt, instead of `torch.cat`,
    which allocates and copies the whole cache at every token (SmolLM2-135M on 2 CPU cores,
    128 rows, 200-token prompts, 64 new tokens: 47 s against 52 s, mean of 2 runs each).
    `keys`/`values` are views of the filled part; batch selection and repetition keep the room."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self):
            self._k = self._v = None
            self.length = 0
            super().__init__()

        keys = property(lambda self: None if self._k is None else self._k[..., : self.length, :],
                        lambda self, t: self._set("_k", t))
        values = property(lambda self: None if self._v is None else self._v[..., : self.length, :],
                          lambda self, t: self._set("_v", t))

        def _set(self, name: str, t) -> None:  # whole tensors assigned by the base class: all filled
            setattr(self, name, t)
            self.length = 0 if t is None or t.dim() < 2 else t.shape[-2]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self._k is None or self._k.dim() < 4 or self.length + n > self._k.shape[-2]:
                self._grow(key_states, value_states, n)
            self._k[..., self.length : self.length + n, :] = key_states
            self._v[..., self.length : self.length + n, :] = value_states
            self.length += n
            return self.keys, self.values

        def _grow(self, key_states, value_states, n: int) -> None:
            length = self.length if self._k is not None and self._k.dim() == 4 else 0
            new = []
            for old, states in ((self._k, key_states), (self._v, value_states)):
                shape = (*states.shape[:-2], length + n + reserve, states.shape[-1])
                buf = states.new_empty(shape)
                if length:
                    buf[..., :length, :] = old[..., :length, :]
                new.append(buf)
            self._k, self._v = new
            self.length = length

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                self._k, self._v = (x.repeat_interleave(repeats, dim=0) for x in (self._k, self._v))

        def batch_select_indices(self, indices) -> None:
            if self.length:
                self._k, self._v = self._k[indices, ...], self._v[indices, ...]

    return ReservedLayer()


def sample(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    prompt_seeds: list[int] | None = None,
    ignore_eos: bool = False,
    compact: bool = True,
    group_size: int = 1,
    decode: str = "dynamic",
    bucket: int = 64,
    return_logprobs: bool = False,
) -> tuple[Tensor, ...]:
    """Sample completions for left-padded prompts with a KV cache.

    input_ids, attention_mask: [B, Tp], left-padded (the last column is real in every row).
    Each row stops after its first token in `eos_token_ids`; `ignore_eos=True` generates
    exactly `max_new_tokens` for every row (benchmarks). `compact=True` drops finished rows
    from the batch and the KV cache (same tokens, less work). `generator` must live on the
    model's device; `prompt_seeds` (one int per prompt) replaces it with a stream per prompt
    (`PromptStreams`). Works on PEFT-wrapped and 4-bit models (same forward kwargs).
    `group_size=G` samples G completions of each prompt (output row p*G + g from prompt p)
    with ONE prefill per distinct prompt: the prompt's KV cache and last logits are
    repeated G times after the prefill, so the prompt costs 1/G of repeating it.
    `decode`: "dynamic" (this module's loop: a growing cache, finished rows dropped),
    "static" or "compiled" (`grpo.staticgen`: fixed shapes bucketed to multiples of
    `bucket`, the step compiled with CUDA graphs), or "auto" (`staticgen.resolve_decode`).

    Returns (B = number of prompts * group_size) completion_ids [B, T] long (right-padded with `pad_token_id`),
    completion_mask [B, T] long (1 up to and including the EOS), truncated [B] bool
    (stopped by the length limit, not by an EOS; all True with `ignore_eos`), where
    T = the longest completion produced (<= max_new_tokens). With `return_logprobs`, a fourth
    tensor: sampler_logp [B, T] float32, each token's log-prob under the distribution it was
    drawn from (`sample_next_token`), 0 at padding; read off the logits the loop computes
    anyway, so it costs no forward pass.
    """
    _check_sampling_args(max_new_tokens, temperature, top_p, top_k)
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be [B, Tp]"
        )
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask: prompts must be LEFT-padded (last column all 1)")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if prompt_seeds is not None and len(prompt_seeds) != input_ids.shape[0]:
        raise ValueError(f"prompt_seeds has {len(prompt_seeds)} seeds for {input_ids.shape[0]} prompts: give one per prompt")
    streams = PromptStreams(prompt_seeds, group_size, input_ids.device) if prompt_seeds is not None else None

    drawn: list[tuple[Tensor, Tensor]] = []  # per decode step: (rows [b], their tokens' log-probs [b])

    def select(logits: Tensor, rows: Tensor) -> Tensor:
        u = streams.uniforms(rows) if streams is not None and temperature > 0 else None
        tok, logp = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                      u=u, generator=generator)
        if return_logprobs:
            drawn.append((rows, logp))
        return tok

    decode = staticgen.resolve_decode(decode, input_ids.device, plain_model=_is_plain(model))
    loop_args = dict(max_new_tokens=max_new_tokens, group_size=group_size, select=select,
                     eos_token_ids=[] if ignore_eos else list(eos_token_ids))
    with torch.no_grad(), _eval_mode(model):
        if decode == "dynamic":
            tokens, lengths, stopped = _decode_loop(model, input_ids, attention_mask, compact=compact, **loop_args)
        else:
            tokens, lengths, stopped = staticgen.static_decode_loop(
                model, input_ids, attention_mask, bucket=bucket, compiled=decode == "compiled",
                pad_token_id=pad_token_id, **loop_args)
    width = int(lengths.max())
    completion_mask = (torch.arange(width, device=lengths.device) < lengths[:, None]).long()
    completion_ids = tokens[:, :width].masked_fill(completion_mask == 0, pad_token_id)
    if not return_logprobs:
        return completion_ids, completion_mask, ~stopped
    sampler_logp = torch.zeros(completion_mask.shape, dtype=torch.float32, device=completion_mask.device)
    for t, (rows, logp) in enumerate(drawn[:width]):  # both loops call select once per step, in order
        sampler_logp[rows, t] = logp
    return completion_ids, completion_mask, ~stopped, sampler_logp * completion_mask


def prefill(model, input_ids: Tensor, attention_mask: Tensor, cache) -> tuple[Tensor, Tensor, Tensor]:
    """Run the left-padded prompts [P, Tp] through the model into `cache`. Left padding:
    the position of a real token = the number of real tokens before it. Returns the last
    column's logits [P, V], the mask [P, Tp] long and the next position [P, 1]."""
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, Tp]
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                cache=cache, use_cache=True, **extra)
    return out.logits[:, -1], mask, position_ids[:, -1:] + 1


def _decode_loop(
    model, input_ids, attention_mask, *, max_new_tokens, eos_token_ids, select, compact, group_size=1
):
    """The loop itself. Returns tokens [B, max_new_tokens] (junk past each row's length),
    lengths [B] long, stopped [B] bool (ended on an EOS); B = input rows * group_size."""
    B, device = input_ids.shape[0] * group_size, input_ids.device
    tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original index of each row still in the batch
    cache = _new_cache(model, reserve=max_new_tokens)
    logits, mask, next_pos = prefill(model, input_ids, attention_mask, cache)
    if group_size > 1:  # one prefill per prompt, then G copies of its cache: [P, ...] -> [P*G, ...]
        cache.batch_repeat_interleave(group_size)
        logits, mask, next_pos = (x.repeat_interleave(group_size, dim=0) for x in (logits, mask, next_pos))

    for t in range(max_new_tokens):
        tok = select(logits, rows)  # [b]
        live = ~stopped[rows]  # [b]; all True when compacting
        tokens[rows[live], t] = tok[live]
        lengths[rows[live]] = t + 1
        stopped[rows[live]] = torch.isin(tok[live], eos)
        still = ~stopped[rows]  # [b]
        if t == max_new_tokens - 1 or not bool(still.any()):
            break
        if compact and not bool(still.all()):
            keep = still.nonzero().squeeze(-1)  # [b']
            rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)  # [b, Tp + t + 1]
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]  # [b, V]
        next_pos = next_pos + 1
    return tokens, lengths, stopped


# ---------------------------------------------------------------------------------------
# Rollout


def default_eos_token_ids(model, tokenizer) -> list[int]:
    """tokenizer.eos_token_id plus model.generation_config.eos_token_id (an int or a
    list), deduplicated in order. Chat models often stop on several ids (Qwen3: both
    `<|im_end|>` and `<|endoftext|>`)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.extend(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return list(dict.fromkeys(ids))


def decode_completions(
    tokenizer, completion_ids: Tensor, completion_mask: Tensor, truncated: Tensor
) -> list[str]:
    """Texts the reward sees: each row's real tokens minus the stopping EOS (the last
    token of a row that was not truncated), decoded with `skip_special_tokens=False` so
    that any other special token the policy emitted stays visible.

    completion_ids, completion_mask: [B, T]; truncated: [B] bool.
    """
    lengths = completion_mask.sum(-1) - (~truncated).long()  # [B], EOS cut
    return [
        tokenizer.decode(row[:n].tolist(), skip_special_tokens=False)
        for row, n in zip(completion_ids.cpu(), lengths.tolist())
    ]


def generate_rollout(
    model,
    tokenizer,
    prompt_texts: list[str],
    *,
    group_size: int,
    max_prompt_length: int | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    eos_token_ids: list[int] | None = None,
    prompt_seeds: list[int] | None = None,
    decode: str = "dynamic",
    bucket: int = 64,
) -> Rollout:
    """G = `group_size` sampled completions for each of P chat-templated prompts.

    Rows p*G .. p*G+G-1 belong to prompt p (B = P * G). Tensors are on the model's
    device (the device of its first parameter). `prompt_seeds` (one per prompt), `decode`
    and `bucket`: see `sample`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if eos_token_ids is None:
        eos_token_ids = default_eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    # Encode each prompt once, then repeat: the truncation warning counts prompts, not rows.
    ids, mask, _ = encode_prompts(tokenizer, prompt_texts, max_prompt_length)  # [P, Tp]
    ids, mask = ids.to(device), mask.to(device)
    prompt_ids = ids.repeat_interleave(group_size, dim=0)  # [B, Tp]
    prompt_mask = mask.repeat_interleave(group_size, dim=0)  # [B, Tp]
    completion_ids, completion_mask, truncated, sampler_logp = sample(
        model, ids, mask, group_size=group_size,
        max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
        pad_token_id=resolve_pad_token_id(tokenizer), temperature=temperature,
        top_p=top_p, top_k=top_k, generator=generator, prompt_seeds=prompt_seeds,
        decode=decode, bucket=bucket, return_logprobs=True,
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=truncated,
        completion_texts=decode_completions(tokenizer, completion_ids, completion_mask, truncated),
        prompt_indices=torch.arange(len(prompt_texts), device=device).repeat_interleave(group_size),
        group_size=group_size,
        sampler_logp=sampler_logp,
    )
