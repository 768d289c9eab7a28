"""Per-token log-probabilities of chosen tokens, from hidden states and the lm_head.

    logp = token_logprobs(hidden, weight, targets, method="fused", temperature=1.0)
    # hidden [N, H] (any float dtype), weight [V, H], targets [N] int64 -> logp [N] float32
    logp, entropy = token_logprobs(..., return_entropy=True)   # entropy [N] float32

With z = hidden @ weight.T / temperature (accumulated, then cast to float32):
    logp_i    = z_{i, y_i} - logsumexp_j z_ij
    entropy_i = logsumexp_j z_ij - sum_j p_ij z_ij,      p = softmax(z)
Gradients with respect to z (what every backward below forms, chunk by chunk):
    d logp_i / d z_ij    = onehot_ij - p_ij
    d entropy_i / d z_ij = -p_ij (z_ij - sum_k p_ik z_ik) = -p_ij (log p_ij + entropy_i)
and then grad_hidden = grad_z @ W / T, grad_weight = grad_z.T @ hidden / T.

The point of the fast methods is memory: the full logits of a GRPO micro-batch
(N = 16k tokens, V = 151936) are 10 GB in float32, before autograd keeps copies of them.

Methods (registry `METHODS`; extra memory beyond inputs and outputs, C = token chunk,
Vc = vocab chunk):
- `naive`     full logits, log_softmax, gather. About 3-4 x N x V floats with autograd.
- `selective` full logits, gather minus a row-wise logsumexp (TRL's `selective_log_softmax`
              trick): saves the log_softmax copy, still about 2-3 x N x V floats.
- `chunked`   C tokens at a time, full vocabulary, autograd through each chunk under
              `torch.utils.checkpoint`: about 2-3 x C x V floats; backward recomputes.
- `fused`     a custom autograd.Function (plain PyTorch, any device). Forward walks token
              chunks and vocab tiles with an online logsumexp in float32 (Milakov &
              Gimelshein 2018) and keeps only per-token statistics ([N] floats): one
              C x Vc float32 work buffer, reused by every chunk (x2 with entropy),
              independent of N. With one vocab tile (the default, Vc = V) each chunk is a
              single in-place row-wise log_softmax instead of max / exp / sum passes.
              Backward recomputes each tile's logits; without entropy it never scales the
              tile: (g (onehot - p)) @ W = g (W[target] - p @ W), rows commute with the
              matmul. When `hidden` requires grad at forward time, the vocab is not tiled
              and no entropy is asked for, the forward also forms grad_hidden for g = 1
              (as Liger-Kernel's fused linear cross entropy does) and keeps it ([N, H]
              float32, the size of the input); since grad_hidden_i is linear in g_i,
              backward only scales its rows by g. Weight-frozen fwd+bwd is then 2 matmuls
              instead of 3; `grad_in_forward=False` turns this off (a forward with grad
              enabled but no backward then wastes no matmul). Entropy is differentiable
              here too (backward recomputes); double backward is not supported.
- `compiled`  the `chunked` path with the per-chunk function under `torch.compile`
              (needs a working inductor backend: a C++ compiler on CPU). Same memory as
              `chunked`.
- `triton`    (CUDA only) the `fused` structure with the row-wise work (online
              logsumexp over vocab tiles, target gather, entropy, gradient of the logits)
              in Triton kernels that read the logits tile in its own dtype (bf16) and
              write the gradient in place; the matmuls stay on cuBLAS. Memory: C x Vc in
              the compute dtype. NOTE: written from the Triton docs and Liger-Kernel's
              design and checked on CPU with the Triton interpreter (TRITON_INTERPRET=1)
              only; it has NOT been run on a GPU.

Chunk sizes are keyword arguments (`token_chunk`, `vocab_chunk`); the CPU default was
chosen with `benchmarks/logprobs.py` (see benchmarks/RESULTS.md). Input validation reads
targets.min()/max(), one host sync on CUDA.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

CPU_TOKEN_CHUNK = 256  # C x V fp32 at V=151936 is 155 MB; larger chunks were not faster on CPU
CUDA_TOKEN_CHUNK = 1024  # C x V bf16 at V=151936 is 311 MB


# ---------------------------------------------------------------------------- validation


def _validate(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a float tensor of shape [N, H] (flatten [B, T, H] first), got "
            f"{getattr(hidden, 'dtype', type(hidden))} of shape {tuple(getattr(hidden, 'shape', ()))}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a float tensor of shape [V, H] (the lm_head), got "
            f"{getattr(weight, 'dtype', type(weight))} of shape {tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)} but weight is {tuple(weight.shape)}"
        )
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets must be a 1-D tensor of length N={hidden.shape[0]}, got shape "
            f"{tuple(getattr(targets, 'shape', ()))}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device, got {hidden.device}, "
            f"{weight.device}, {targets.device}"
        )
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"targets must lie in [0, V-1] = [0, {weight.shape[0] - 1}], got values in [{lo}, {hi}]"
            )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype: the wider of the two (bf16 x bf16 stays bf16, bf16 x fp32 is fp32)."""
    return torch.promote_types(hidden.dtype, weight.dtype)


def _check_chunk(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


# ---------------------------------------------------------------- reference methods


def _logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """z: [n, V] float32 = hidden @ weight.T / temperature (matmul in the compute dtype)."""
    cd = _compute_dtype(hidden, weight)
    return (hidden.to(cd) @ weight.to(cd).T).float() / temperature


def _entropy_from_logits(z: Tensor, lse: Tensor) -> Tensor:
    """entropy: [n] = -sum_j p_j (z_j - lse), for z: [n, V] float32 and lse: [n].
    (Not lse - sum_j p_j z_j: with logits ~1e3 that difference cancels catastrophically.)"""
    logprobs = z - lse[:, None]
    return -(logprobs.exp() * logprobs).sum(-1)


def _naive(hidden, weight, targets, temperature, return_entropy):
    """Full logits -> log_softmax -> gather. Memory: ~3-4 x N x V float32 with autograd."""
    logprobs = torch.log_softmax(_logits(hidden, weight, temperature), dim=-1)  # [N, V]
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)  # [N]
    entropy = -(logprobs.exp() * logprobs).sum(-1) if return_entropy else None
    return logp, entropy


def _chunk_logp(hidden, weight, targets, temperature: float, return_entropy: bool):
    """logp (and entropy): [n] from gather minus logsumexp on the float32 logits [n, V]."""
    z = _logits(hidden, weight, temperature)  # [n, V]
    lse = torch.logsumexp(z, dim=-1)  # [n]
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    if return_entropy:
        return logp, _entropy_from_logits(z, lse)
    return (logp,)


def _selective(hidden, weight, targets, temperature, return_entropy):
    """Full logits, gather minus logsumexp (TRL's selective_log_softmax trick).
    Memory: ~2-3 x N x V float32 with autograd (no log_softmax copy)."""
    out = _chunk_logp(hidden, weight, targets, temperature, return_entropy)
    return out[0], (out[1] if return_entropy else None)


def _run_chunks(chunk_fn, hidden, weight, targets, temperature, return_entropy, token_chunk):
    """Apply `chunk_fn` to token chunks; checkpoint each one when autograd is recording,
    so that only one chunk's logits are alive at a time (backward recomputes them)."""
    _check_chunk("token_chunk", token_chunk)
    token_chunk = token_chunk or CPU_TOKEN_CHUNK
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, ents = [], []
    for n0 in range(0, hidden.shape[0], token_chunk):
        args = (hidden[n0 : n0 + token_chunk], weight, targets[n0 : n0 + token_chunk], temperature, return_entropy)
        if grad:
            out = torch.utils.checkpoint.checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            out = chunk_fn(*args)
        logps.append(out[0])
        if return_entropy:
            ents.append(out[1])
    if not logps:  # N == 0
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if return_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if return_entropy else None)


def _chunked(hidden, weight, targets, temperature, return_entropy, token_chunk=None):
    """Token chunks x full vocabulary, autograd through each checkpointed chunk.
    Memory: ~2-3 x token_chunk x V float32, independent of N."""
    return _run_chunks(_chunk_logp, hidden, weight, targets, temperature, return_entropy, token_chunk)


@functools.cache
def compile_status() -> str | None:
    """None when `torch.compile` works here, else the reason it does not (cached)."""
    try:
        fn = torch.compile(lambda x: torch.logsumexp(x * 2.0, dim=-1), dynamic=False)
        fn(torch.randn(4, 8))
    except Exception as exc:  # noqa: BLE001 - any backend failure means "not here"
        return f"torch.compile does not work here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


@functools.cache
def _compiled_chunk_fn():
    return torch.compile(_chunk_logp, dynamic=False)


def _compiled(hidden, weight, targets, temperature, return_entropy, token_chunk=None):
    """`chunked` with the per-chunk function compiled (inductor fuses the logsumexp and the
    gather around the matmul). Memory as `chunked`. First call per shape compiles (seconds)."""
    reason = compile_status()
    if reason is not None:
        raise RuntimeError(f"method 'compiled' is unavailable: {reason}")
    return _run_chunks(_compiled_chunk_fn(), hidden, weight, targets, temperature, return_entropy, token_chunk)


# ---------------------------------------------------------------- fused (custom autograd)


@dataclass
class _RowStats:
    """Online logsumexp state of n rows, all float32 [n] (Milakov & Gimelshein 2018,
    "Online normalizer calculation for softmax"), extended with the entropy sum:
    m = running max, s = sum_j exp(z_j - m), t = sum_j exp(z_j - m) (z_j - m),
    tgt = the target's logit (0 until its tile is seen)."""

    m: Tensor
    s: Tensor
    t: Tensor
    tgt: Tensor

    @classmethod
    def empty(cls, n: int, device) -> "_RowStats":
        zeros = lambda: torch.zeros(n, dtype=torch.float32, device=device)  # noqa: E731
        return cls(torch.full((n,), -math.inf, device=device), zeros(), zeros(), zeros())

    def lse(self) -> Tensor:
        return self.m + torch.log(self.s)

    def entropy(self) -> Tensor:
        # entropy = lse - sum p z = (m + log s) - (m + t / s)
        return torch.log(self.s) - self.t / self.s


class _TorchTiles:
    """Row-wise work on one logits tile in plain PyTorch; tiles are float32 and tempered.
    Work buffers are reused across chunks (`buf`), so large chunks are not re-faulted."""

    @staticmethod
    def logits(h_c: Tensor, w_tile: Tensor, temperature: float, buf: Tensor | None) -> Tensor:
        """z: [n, v] float32 = h_c @ w_tile.T / T, written into `buf` when it is float32."""
        n, v = h_c.shape[0], w_tile.shape[0]
        if buf is not None and h_c.dtype == torch.float32:
            z = torch.mm(h_c, w_tile.T, out=buf[: n * v].view(n, v))
        else:
            z = (h_c @ w_tile.T).float()
        return z.div_(temperature) if temperature != 1.0 else z

    @staticmethod
    def full_rows(z: Tensor, t_c: Tensor, want_entropy: bool, want_p: bool):
        """Whole-vocabulary tile z: [n, V] -> (lse, target logit, entropy or None, p or None),
        [n] each and p = softmax(z): [n, V] (z's buffer or, with entropy, a new one). One fused
        row-wise log_softmax (each row is processed while it sits in cache) instead of
        separate max / exp / sum passes."""
        tgt = z.gather(1, t_c[:, None]).squeeze(1)
        z_max, j_max = z.max(dim=1)
        logsm = torch.ops.aten._log_softmax.out(z, 1, False, out=z)  # in place, row by row
        # lse = z_j - log p_j at the row's argmax, where |log p_j| <= log V is small and
        # exact to ~1e-6; at the target, log p could be ~ -1e3 and carry its rounding.
        lse = z_max - logsm.gather(1, j_max[:, None]).squeeze(1)
        if want_entropy:
            p = torch.exp(logsm)
            ent = -torch.bmm(p[:, None, :], logsm[:, :, None]).view(-1)  # -sum p log p, no temporary
            return lse, tgt, ent, p
        return lse, tgt, None, (logsm.exp_() if want_p else None)

    @staticmethod
    def stats(z: Tensor, t_rel: Tensor, st: _RowStats, want_entropy: bool, temperature: float) -> None:
        """Fold tile z: [n, v] into the online state st (z is overwritten);
        t_rel: [n] = target - tile start (out of [0, v) when the target is elsewhere)."""
        v = z.shape[1]
        in_tile = (t_rel >= 0) & (t_rel < v)
        picked = z.gather(1, t_rel.clamp(0, v - 1)[:, None]).squeeze(1)
        st.tgt += torch.where(in_tile, picked, 0.0)
        m_new = torch.maximum(st.m, z.amax(dim=1))
        scale = torch.exp(st.m - m_new)  # 0 on the first tile (m = -inf)
        z.sub_(m_new[:, None])  # z - m_new
        if want_entropy:
            e = torch.exp(z)
            # rebase t from m to m_new: t' = scale (t + (m - m_new) s); guard m = -inf, s = 0
            delta = torch.where(st.s > 0, st.m - m_new, 0.0)
            st.t = scale * (st.t + delta * st.s) + torch.bmm(e[:, None, :], z[:, :, None]).view(-1)
            z = e
        else:
            z.exp_()
        st.s = st.s * scale + z.sum(1)
        st.m = m_new

    @staticmethod
    def grad(z, t_rel, lse, ent, g_logp, g_ent, temperature):
        """Gradient of sum_i g_logp_i logp_i + g_ent_i entropy_i w.r.t. the raw logits of
        tile z (float32, tempered, overwritten), in factored form (a, r, c):
            grad_raw = r[:, None] * a + c[:, None] * onehot(target)   (r None: 1)
        so that without entropy no pass over the tile is spent on scaling: a = p, r = -g/T."""
        z.sub_(lse[:, None])  # log p
        if g_ent is None:
            return z.exp_(), -g_logp / temperature, g_logp / temperature
        p = torch.exp(z)
        # -g p - g_ent p (log p + entropy) = p * (-(g + g_ent (log p + entropy)))
        a = z.add_(ent[:, None]).mul_(-g_ent[:, None]).sub_(g_logp[:, None]).mul_(p).div_(temperature)
        return a, None, g_logp / temperature


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (float32) = / += a @ b, without an extra copy when a, b are float32."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


def _apply_tile_grad(a, r, c, t_rel, h_c, w_tile, gh_c, gw_tile, first_tile):
    """gh_c [n, H] (=|+=) grad_raw @ w_tile and gw_tile [v, H] += grad_raw.T @ h_c, float32,
    with grad_raw = r * a + c * onehot in the factored form of `grad` (r, c: [n] or None)."""
    v = w_tile.shape[0]
    a = a.to(h_c.dtype)
    if c is not None:
        in_tile = (t_rel >= 0) & (t_rel < v)
        c = torch.where(in_tile, c, 0.0)
        t_idx = t_rel.clamp(0, v - 1)
    if gh_c is not None:
        if r is None:
            _mm_into(gh_c, a, w_tile, accumulate=not first_tile)
        else:  # row scaling commutes with the matmul: (r * a) @ W = r * (a @ W)
            ah = (a @ w_tile).float()
            gh_c.copy_(ah.mul_(r[:, None])) if first_tile else gh_c.add_(ah.mul_(r[:, None]))
        if c is not None:
            gh_c.add_(c[:, None] * w_tile[t_idx].float())  # onehot @ W = W[target]
    if gw_tile is not None:
        hr = h_c if r is None else (h_c.float() * r[:, None]).to(h_c.dtype)
        _mm_into(gw_tile, a.T, hr, accumulate=True)
        if c is not None:
            gw_tile.index_add_(0, t_idx, c[:, None] * h_c.float())  # onehot.T @ h


class _FusedLogprobs(torch.autograd.Function):
    """Forward keeps per-token statistics only; backward recomputes tiles (or scales the
    grad_hidden formed in forward). See the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy, token_chunk, vocab_chunk, grad_in_forward, tiles):
        n_tok, hid = hidden.shape
        vocab = weight.shape[0]
        cd = _compute_dtype(hidden, weight)
        h, w = hidden.to(cd), weight.to(cd)
        lse = torch.empty(n_tok, dtype=torch.float32, device=hidden.device)
        tgt = torch.empty_like(lse)
        ent = torch.empty_like(lse) if want_entropy else None
        one_tile = vocab_chunk >= vocab
        fast_rows = one_tile and hasattr(tiles, "full_rows")
        eager = grad_in_forward and one_tile and not want_entropy
        grad_hidden = torch.empty(n_tok, hid, dtype=torch.float32, device=hidden.device) if eager else None
        buf = _work_buffer(tiles, min(token_chunk, n_tok) * min(vocab_chunk, vocab), hidden.device)
        for n0 in range(0, n_tok, token_chunk):
            sl = slice(n0, n0 + token_chunk)
            h_c, t_c = h[sl], targets[sl]
            if fast_rows:
                z = tiles.logits(h_c, w, temperature, buf)  # [c, V]
                lse[sl], tgt[sl], ent_c, p = tiles.full_rows(z, t_c, want_entropy, want_p=eager)
                if want_entropy:
                    ent[sl] = ent_c
                if eager:  # grad for g = 1: (onehot - p) / T @ W = (W[target] - p @ W) / T
                    a, r, c = p, torch.full_like(lse[sl], -1.0 / temperature), torch.full_like(lse[sl], 1.0 / temperature)
                    _apply_tile_grad(a, r, c, t_c, h_c, w, grad_hidden[sl], None, first_tile=True)
                continue
            st = _RowStats.empty(h_c.shape[0], hidden.device)
            for v0 in range(0, vocab, vocab_chunk):
                z = tiles.logits(h_c, w[v0 : v0 + vocab_chunk], temperature, buf)  # [c, vc]
                tiles.stats(z, t_c - v0, st, want_entropy, temperature)
            lse[sl], tgt[sl] = st.lse(), st.tgt
            if want_entropy:
                ent[sl] = st.entropy()
            if eager:  # one tile: z holds the raw logits still
                a, r, c = tiles.grad(z, t_c, lse[sl], None, torch.ones_like(lse[sl]), None, temperature)
                _apply_tile_grad(a, r, c, t_c, h_c, w, grad_hidden[sl], None, first_tile=True)
        ctx.save_for_backward(hidden, weight, targets, lse, ent, grad_hidden)
        ctx.cfg = (temperature, token_chunk, vocab_chunk, tiles)
        ctx.set_materialize_grads(False)
        logp = tgt - lse
        return (logp, ent) if want_entropy else logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent, grad_hidden_g1 = ctx.saved_tensors
        temperature, token_chunk, vocab_chunk, tiles = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 7
        if g_logp is None and g_ent is None:
            return (None, None) + nones
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_ent = None if g_ent is None else g_ent.float()

        grad_h = grad_w = None
        if grad_hidden_g1 is not None and g_ent is None:
            grad_h = (grad_hidden_g1 * g_logp[:, None]).to(hidden.dtype)  # rows are linear in g
            need_h = False
        if not (need_h or need_w):
            return (grad_h, grad_w) + nones

        cd = _compute_dtype(hidden, weight)
        h, w = hidden.to(cd), weight.to(cd)
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        gh = torch.empty(n_tok, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        gw = torch.zeros(vocab, weight.shape[1], dtype=torch.float32, device=weight.device) if need_w else None
        buf = _work_buffer(tiles, min(token_chunk, n_tok) * min(vocab_chunk, vocab), hidden.device)
        for n0 in range(0, n_tok, token_chunk):
            sl = slice(n0, n0 + token_chunk)
            h_c, t_c = h[sl], targets[sl]
            for v0 in range(0, vocab, vocab_chunk):
                vs = slice(v0, v0 + vocab_chunk)
                z = tiles.logits(h_c, w[vs], temperature, buf)
                a, r, c = tiles.grad(
                    z, t_c - v0, lse[sl], None if ent is None else ent[sl], g_logp[sl],
                    None if g_ent is None else g_ent[sl], temperature,
                )
                _apply_tile_grad(
                    a, r, c, t_c - v0, h_c, w[vs], gh[sl] if need_h else None, gw[vs] if need_w else None, v0 == 0
                )
        if need_h:
            grad_h = gh.to(hidden.dtype)
        if need_w:
            grad_w = gw.to(weight.dtype)
        return (grad_h, grad_w) + nones


def _work_buffer(tiles, numel: int, device) -> Tensor | None:
    """One float32 tile buffer reused by every chunk of a call (torch tiles only)."""
    return torch.empty(numel, dtype=torch.float32, device=device) if tiles is _TorchTiles else None


def _fused_with(tiles, default_token_chunk):
    def method(hidden, weight, targets, temperature, return_entropy, token_chunk=None, vocab_chunk=None, grad_in_forward=True):
        _check_chunk("token_chunk", token_chunk)
        _check_chunk("vocab_chunk", vocab_chunk)
        token_chunk = token_chunk or default_token_chunk
        vocab_chunk = vocab_chunk or weight.shape[0]
        # grad mode is off inside Function.forward, so decide here whether forming
        # grad_hidden in forward can pay off (someone will call backward w.r.t. hidden).
        eager = grad_in_forward and torch.is_grad_enabled() and hidden.requires_grad
        out = _FusedLogprobs.apply(
            hidden, weight, targets, float(temperature), return_entropy, token_chunk, vocab_chunk, eager, tiles
        )
        return out if return_entropy else (out, None)

    return method


_fused = _fused_with(_TorchTiles, CPU_TOKEN_CHUNK)
_fused.__doc__ = (
    "Custom autograd.Function, token chunks x vocab tiles, online logsumexp in float32. "
    "Memory: token_chunk x vocab_chunk float32 (x2 with entropy) plus [N] statistics, "
    "plus [N, H] float32 when grad_hidden is formed in forward."
)


# ---------------------------------------------------------------- triton (CUDA only)


@functools.cache
def triton_status(device_type: str = "cuda") -> str | None:
    """None when the `triton` method can run on this device type, else the reason."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the Triton interpreter runs the kernels on CPU tensors (for tests)
    if device_type != "cuda" or not torch.cuda.is_available():
        return "the triton method needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter)"
    return None


@functools.cache
def _triton_tiles():
    """Build the Triton kernels on first use (importing triton is slow and CUDA-only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stats_kernel(z_ptr, stride_z, n_cols, t_rel_ptr, m_ptr, s_ptr, t_ptr, tgt_ptr, inv_t, BLOCK: tl.constexpr):
        # One program per row: fold this tile into the row's online (m, s, t, tgt).
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        t_rel = tl.load(t_rel_ptr + row)
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        t = tl.load(t_ptr + row)
        tgt = tl.load(tgt_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            tgt += tl.sum(tl.where(mask & (cols == t_rel), z, 0.0), axis=0)  # t_rel may be a padded column
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)  # 0 while m = -inf
            d = tl.where(mask, z - m_new, 0.0)
            e = tl.where(mask, tl.exp(d), 0.0)
            delta = tl.where(s > 0, m - m_new, 0.0)
            t = scale * (t + delta * s) + tl.sum(e * d, axis=0)
            s = s * scale + tl.sum(e, axis=0)
            m = m_new
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(t_ptr + row, t)
        tl.store(tgt_ptr + row, tgt)

    @triton.jit
    def grad_kernel(z_ptr, stride_z, n_cols, t_rel_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, inv_t, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row: overwrite the raw logits with d loss / d raw logits
        # = inv_t * (g (onehot - p) - g_ent p (log p + entropy)).
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        t_rel = tl.load(t_rel_ptr + row)
        lse = tl.load(lse_ptr + row)
        gl = tl.load(gl_ptr + row)
        if HAS_ENT:
            ent = tl.load(ent_ptr + row)
            ge = tl.load(ge_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            logp = z - lse
            p = tl.exp(logp)
            coef = -gl
            if HAS_ENT:
                coef = coef - ge * (logp + ent)
            grad = (p * coef + tl.where(cols == t_rel, gl, 0.0)) * inv_t
            tl.store(z_row + cols, grad.to(z_ptr.dtype.element_ty), mask=mask)

    def block(n_cols: int) -> int:
        return min(triton.next_power_of_2(n_cols), 4096)

    class TritonTiles:
        """Tiles stay raw (compute dtype, no / T); kernels cast to float32 and temper."""

        @staticmethod
        def logits(h_c, w_tile, temperature, buf):
            return h_c @ w_tile.T  # [n, v] raw logits in the compute dtype, contiguous

        @staticmethod
        def stats(z, t_rel, st, want_entropy, temperature):
            stats_kernel[(z.shape[0],)](
                z, z.stride(0), z.shape[1], t_rel.contiguous(), st.m, st.s, st.t, st.tgt, 1.0 / temperature,
                BLOCK=block(z.shape[1]),
            )
            return z

        @staticmethod
        def grad(z, t_rel, lse, ent, g_logp, g_ent, temperature):
            has_ent = g_ent is not None
            grad_kernel[(z.shape[0],)](
                z, z.stride(0), z.shape[1], t_rel.contiguous(), lse.contiguous(),
                ent.contiguous() if has_ent else lse, g_logp.contiguous(),
                g_ent.contiguous() if has_ent else lse, 1.0 / temperature, HAS_ENT=has_ent, BLOCK=block(z.shape[1]),
            )
            return z, None, None  # the full gradient, onehot included (see _apply_tile_grad)

    return TritonTiles


def _triton(hidden, weight, targets, temperature, return_entropy, token_chunk=None, vocab_chunk=None, grad_in_forward=True):
    """Fused path with Triton row kernels (CUDA only; NOT yet run on a GPU, see module
    docstring). Memory: token_chunk x vocab_chunk in the compute dtype plus [N] stats."""
    reason = triton_status(hidden.device.type)
    if reason is not None:
        raise RuntimeError(f"method 'triton' is unavailable: {reason}")
    return _fused_with(_triton_tiles(), CUDA_TOKEN_CHUNK)(
        hidden, weight, targets, temperature, return_entropy, token_chunk, vocab_chunk, grad_in_forward
    )


# ---------------------------------------------------------------- public API

METHODS: dict[str, Callable] = {
    "naive": _naive,
    "selective": _selective,
    "chunked": _chunked,
    "fused": _fused,
    "compiled": _compiled,
    "triton": _triton,
}


def default_method(device: torch.device | str) -> str:
    """The method the trainer uses by default: "fused", on every device.

    "triton" is opt-in (`logprob_method: triton`) until it has been run and measured on a
    GPU (it has only been checked under the Triton interpreter on CPU); the default switches
    on CUDA once benchmarks/logprobs.py shows it correct and ahead of "fused" there.
    """
    torch.device(device)  # validate the argument
    return "fused"


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    method: str = "fused",
    temperature: float = 1.0,
    return_entropy: bool = False,
    **chunk_kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each target token under softmax(hidden @ weight.T / temperature).

    hidden: [N, H] any float dtype; weight: [V, H] (the lm_head); targets: [N] int64 in [0, V).
    Returns logp: [N] float32, differentiable w.r.t. hidden (and weight when it requires
    grad); with return_entropy=True, (logp, entropy) where entropy: [N] float32 is the
    entropy of the tempered distribution (differentiable for every method).
    chunk_kwargs: `token_chunk` (chunked, compiled, fused, triton), `vocab_chunk` and
    `grad_in_forward` (fused, triton); see the module docstring.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    _validate(hidden, weight, targets, temperature)
    logp, entropy = METHODS[method](hidden, weight, targets.long(), float(temperature), return_entropy, **chunk_kwargs)
    return (logp, entropy) if return_entropy else logp
