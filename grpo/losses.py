"""Policy-gradient losses: pure functions of log-prob, advantage and mask tensors.

Every surrogate returns `(per_token_loss [B, T], stats)`; `aggregate` turns a per-token
loss into the scalar to backpropagate, with whole-batch normalizers so that summing the
micro-batch losses of one optimizer step gives exactly the full-batch loss (gradient
accumulation equals one big batch). Stats are detached scalar tensors.

Sources:
- PPO clipped surrogate: Schulman et al. 2017, arXiv:1707.06347, eq. 7.
- Clip-higher (asymmetric clip range): DAPO, Yu et al. 2025, arXiv:2503.14476, Sec. 3.1.
- Sequence-level ratio: GSPO, Zheng et al. 2025, arXiv:2507.18071 (GSPO-token variant).
- KL estimators k1/k2/k3: Schulman 2020, http://joschu.net/blog/kl-approx.html; k3 is the
  one GRPO uses (DeepSeekMath, arXiv:2402.03300, eq. 4).
- Loss aggregation: GRPO eq. 3 (per-sequence mean), DAPO Sec. 3.3 (token mean, 1 / sum_i |o_i|),
  Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, Sec. 3.2 (constant normalizer).
- Soft overlong punishment: DAPO Sec. 3.4, eq. 13.

Where we depart from the papers:
- "bnpo" and "dapo" are the same formula here (token mean over the whole batch, the
  DAPO objective); TRL's "bnpo" normalizes per micro-batch, which breaks the
  accumulation equivalence.
- The KL estimators are not clamped: k3 = exp(ref - logp) - ... overflows float32 when
  ref_logp - logp > ~88, which sampled tokens do not reach in practice.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# ------------------------------------------------------------------------- KL estimators


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(y) - log pi_ref(y): unbiased for KL(pi || pi_ref), high variance, can be < 0.

    Args:
        logp: [B, T] policy log-probs of the sampled tokens.
        ref_logp: [B, T] reference log-probs of the same tokens.

    Returns:
        [B, T].
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi - log pi_ref)^2: biased, low variance, >= 0.

    Args:
        logp: [B, T]. ref_logp: [B, T].

    Returns:
        [B, T].
    """
    return 0.5 * (logp - ref_logp).pow(2)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1: unbiased for KL(pi || pi_ref), >= 0.

    Schulman 2020 ("Approximating KL Divergence"): with r = pi_ref / pi and samples from
    pi, (r - 1) - log r is unbiased (E[r] = 1) and >= 0 since log x <= x - 1, with
    equality iff r = 1. GRPO's KL term (DeepSeekMath eq. 4).

    Args:
        logp: [B, T] policy log-probs of the sampled tokens.
        ref_logp: [B, T] reference log-probs.

    Returns:
        [B, T]; exactly 0 where logp == ref_logp.

    Example:
        >>> kl_k3(torch.tensor([0.0]), torch.tensor([0.0]))
        tensor([0.])
    """
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}

# ------------------------------------------------------------------------ surrogates


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.float().mean()
    m = mask.to(torch.float32)
    return (x.float() * m).sum() / m.sum().clamp(min=1)


def _as_token_adv(adv: Tensor, like: Tensor) -> Tensor:
    """[B] or [B, T] advantages -> broadcastable to [B, T]."""
    if adv.dim() == 1 and adv.shape[0] == like.shape[0]:
        return adv.unsqueeze(-1)  # [B, 1]
    if adv.shape == like.shape:
        return adv
    raise ValueError(
        f"adv must be [B] or [B, T] = {tuple(like.shape)}, got shape {tuple(adv.shape)}"
    )


def _check_eps(eps_low: float, eps_high: float) -> None:
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")


def _clip_stats(
    ratio: Tensor, adv: Tensor, mask: Tensor | None, eps_low: float, eps_high: float
) -> dict[str, Tensor]:
    """Fractions of (real) tokens where the clip is active, i.e. the gradient is cut."""
    ratio, adv = ratio.detach(), adv.detach().expand_as(ratio)
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return {
        "clip_low_frac": _masked_mean(low, mask),
        "clip_high_frac": _masked_mean(high, mask),
        "clip_frac": _masked_mean(low | high, mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }


def _ppo_clip(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), elementwise."""
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with a token-level ratio and an asymmetric clip range.

    loss_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A), r_t = exp(logp -
    old_logp) (PPO eq. 7). eps_high > eps_low is DAPO's clip-higher (Sec. 3.1): it lets
    low-probability tokens with A > 0 grow further, against entropy collapse.

    Args:
        logp: [B, T] current policy log-probs (with grad).
        old_logp: [B, T] log-probs of the policy that sampled (no grad).
        adv: [B] (one per sequence) or [B, T] advantages.
        eps_low: lower clip, ratio >= 1 - eps_low.
        eps_high: upper clip, ratio <= 1 + eps_high.
        mask: [B, T] completion mask, only for the stats (None = every entry).

    Returns:
        per_token_loss [B, T] (unmasked: `aggregate` applies the mask), and detached
        stats: clip_low_frac (ratio < 1 - eps_low and A < 0), clip_high_frac (ratio >
        1 + eps_high and A > 0), clip_frac (either), ratio_mean.
    """
    _check_eps(eps_low, eps_high)
    if logp.shape != old_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and old_logp {tuple(old_logp.shape)} differ")
    adv = _as_token_adv(adv, logp)
    ratio = torch.exp(logp - old_logp)  # [B, T]
    loss = _ppo_clip(ratio, adv, eps_low, eps_high)
    return loss, _clip_stats(ratio, adv, mask, eps_low, eps_high)


def gspo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: one length-normalized importance ratio per sequence, clipped per sequence.

    Zheng et al. 2025 (arXiv:2507.18071): s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) =
    exp(mean_t (logp_t - old_logp_t)) over the real tokens, and the objective is
    mean_i min(s_i A_i, clip(s_i) A_i). We use the "GSPO-token" form
    s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]): its value is s_i at every token and
    d s_i,t / d logp_t = s_i, so after the per-sequence token mean (`aggregate(...,
    "grpo")`) the gradient is s_i * A_i * mean_t grad logp_t, the sequence-level one.
    GSPO's clip ranges are tiny (the paper uses 3e-4 / 4e-4), since s_i is a per-token
    geometric mean.

    Args:
        logp: [B, T] current log-probs (with grad).
        old_logp: [B, T] sampling-policy log-probs.
        adv: [B] advantages ([B, T] allowed: GSPO-token's per-token advantages).
        mask: [B, T] completion mask.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] for s_i.

    Returns:
        per_token_loss [B, T] (for a [B] adv, the same value at every real token of a
        row) and detached stats, token-weighted over real tokens as in
        `clipped_surrogate` (ratio_mean is the token-weighted mean of s_i).
    """
    _check_eps(eps_low, eps_high)
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(
            f"logp, old_logp, mask must share one [B, T] shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    adv = _as_token_adv(adv, logp)
    real = mask.bool()
    lengths = real.sum(dim=1).clamp(min=1)  # [B]
    log_ratio = torch.where(real, logp - old_logp, torch.zeros_like(logp))
    seq_ratio = torch.exp(log_ratio.sum(dim=1) / lengths)  # [B], s_i
    token_ratio = seq_ratio.detach().unsqueeze(-1) * torch.exp(logp - logp.detach())  # [B, T]
    loss = _ppo_clip(token_ratio, adv, eps_low, eps_high)
    return loss, _clip_stats(token_ratio, adv, mask, eps_low, eps_high)


def _clip_policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """`clipped_surrogate` in the uniform `POLICY_LOSSES` signature (mask positional)."""
    return clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, mask=mask)


# Uniform signature: fn(logp [B,T], old_logp [B,T], adv [B] or [B,T], mask [B,T],
# eps_low, eps_high) -> (per_token_loss [B,T], stats).
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "clip": _clip_policy_loss,
    "gspo": gspo_surrogate,
}

# ------------------------------------------------------------------------ aggregation

AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """Reduce a per-token loss to the scalar of one micro-batch, normalized by the batch.

    The normalizers are those of the whole optimizer-step batch, not of this
    micro-batch, so every mode is a sum over sequences divided by a batch constant and
    sum(aggregate(micro-batch)) == aggregate(whole batch), values and gradients:
    gradient accumulation is exactly one big batch.

    - "grpo": sum_i (sum_t l_it m_it / |y_i|) / num_sequences: each sequence's token
      mean, then the mean over sequences (DeepSeekMath eq. 3, the 1/G * 1/|o_i| sums).
    - "bnpo", "dapo": sum_it l_it m_it / num_tokens: the token mean over the batch, every
      token weighs the same whatever its sequence's length (DAPO Sec. 3.3,
      "token-level policy gradient loss"). Same formula, both names kept.
    - "dr_grpo": sum_it l_it m_it / (num_sequences * max_completion_length): a constant
      normalizer, no length bias (Dr. GRPO, arXiv:2503.20783, Sec. 3.2).

    Args:
        per_token: [b, T] per-token loss of this micro-batch.
        mask: [b, T] completion mask.
        mode: one of `AGGREGATIONS`.
        num_sequences: sequences in the whole batch (sum of b over micro-batches), also the
            rows masked out of the loss (GRPO's 1/G and Dr.GRPO's constant count every output).
        num_tokens: real tokens in the whole batch (sum of mask over micro-batches).
        max_completion_length: the generation budget T_max (dr_grpo only).

    Returns:
        Scalar tensor.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation mode must be one of {AGGREGATIONS}, got {mode!r}")
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must be equal [B, T]"
        )
    for name, value in [
        ("num_sequences", num_sequences),
        ("num_tokens", num_tokens),
        ("max_completion_length", max_completion_length),
    ]:
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    real = mask.bool()
    masked = per_token.masked_fill(~real, 0.0)  # [b, T]
    if mode == "grpo":
        lengths = real.sum(dim=1).clamp(min=1)  # [b]
        return (masked.sum(dim=1) / lengths).sum() / num_sequences
    if mode in ("bnpo", "dapo"):
        return masked.sum() / num_tokens
    return masked.sum() / (num_sequences * max_completion_length)  # dr_grpo


# ------------------------------------------------------------------------ sampler correction


def truncated_is_weights(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance sampling (Yao et al. 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training"): w_t = min(pi_old(y_t) /
    pi_sampler(y_t), C), detached. The rollout was drawn from the sampler (a merged copy,
    maybe in another precision), not from the learner pi_old whose ratio the surrogate
    uses; w corrects the policy gradient for that, and the cap C bounds its variance.

    Args:
        old_logp: [B, T] learner log-probs of the sampled tokens at rollout time.
        sampler_logp: [B, T] the sampler's log-probs of the same tokens.
        cap: C > 0.

    Returns:
        [B, T] weights in (0, C], no gradient.

    Example (C = 2): old - sampler = [0, log 1.5, log 3] -> ratios [1, 1.5, 3] -> [1, 1.5, 2].
    """
    return torch.exp(old_logp.detach() - sampler_logp).clamp(max=cap)


def mismatch_sums(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> dict[str, float]:
    """Sampler / learner mismatch over the real tokens of a batch, as sums (so micro-batches
    and ranks add up): k3 of the sampler against the learner (KL(sampler || learner), the
    samples being the sampler's: log r = old - sampler, k3 = e^log r - log r - 1), |old -
    sampler|, the number of tokens whose ratio pi_old / pi_sampler exceeds `cap` (their TIS
    weight is truncated), the token count, and the largest ratio (a max, not a sum); in
    float64, since the differences of a float32 sampler are at rounding level.

    old_logp, sampler_logp, mask: [B, T]."""
    real = mask.bool()
    log_r = (old_logp.detach().double() - sampler_logp.double()).masked_fill(~real, 0.0)  # [B, T]
    ratio = torch.exp(log_r)
    return {
        "kl": float((torch.expm1(log_r) - log_r).sum()),  # expm1: no cancellation near r = 1, so >= 0
        "abs_diff": float(log_r.abs().sum()),
        "truncated": float(((ratio > cap) & real).sum()),
        "tokens": float(real.sum()),
        "ratio_max": float(ratio[real].max()) if bool(real.any()) else 1.0,
    }


# ------------------------------------------------------------------------ the objective


def objective(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    policy_loss: str,
    aggregation: str,
    norms: dict[str, int],
    eps_low: float,
    eps_high: float,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_in_loss: bool = True,
    bias_corrected_kl: bool = False,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one micro-batch: policy surrogate (times the sampler-correction weights)
    + beta * KL, aggregated with the whole batch's normalizers, so that the micro-batch
    losses of one optimizer step sum to the big-batch loss.

    loss_t = w_t * surrogate_t + beta * kl_t, kl_t = k3(logp_t, ref_t), or with
    `bias_corrected_kl` (DeepSeek-V3.2, arXiv:2512.02556; TRL `use_bias_correction_kl`)
    r_t * k3, r_t = exp(logp_t - old_logp_t), which makes k3
    unbiased for KL(pi || ref) when the samples come from pi_old (r_t keeps its gradient, as
    in TRL). The weights w_t apply to the surrogate only, as in Yao et al. 2025 and verl (the
    paper corrects the policy gradient; PPO's value loss is not weighted).

    Args:
        logp: [b, T] current log-probs (with grad). old_logp: [b, T] at rollout (no grad).
        adv: [b] or [b, T]. mask: [b, T] tokens in the loss.
        policy_loss: key of POLICY_LOSSES. aggregation: an `aggregate` mode.
        norms: num_sequences, num_tokens, max_completion_length of the whole batch.
        ref_logp: [b, T] reference log-probs, or None (no KL term: beta == 0).
        kl_in_loss: False when the KL is already in the rewards (`kl_in_reward`): then the
            KL is only measured.
        is_weights: [b, T] detached sampler-correction weights (`truncated_is_weights`), or None.

    Returns:
        (scalar loss, stats): the policy loss's stats, and "kl_sum" (sum of the KL over the
        mask) when ref_logp is given.
    """
    per_token, stats = POLICY_LOSSES[policy_loss](logp, old_logp, adv, mask, eps_low, eps_high)
    if is_weights is not None:
        per_token = per_token * is_weights
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)  # [b, T]
        if bias_corrected_kl:
            kl = torch.exp(logp - old_logp) * kl
        if kl_in_loss:
            per_token = per_token + beta * kl
        stats["kl_sum"] = (kl.detach() * mask).sum()
    return aggregate(per_token, mask, aggregation, **norms), stats


# ------------------------------------------------------------------------ value loss


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    The clipped value term of OpenAI baselines' PPO2 (discussed in Engstrom et al.
    2020, "Implementation Matters in Deep Policy Gradients", arXiv:2005.12729), as in
    torchtune's `PPOLoss`.

    Args:
        values: [B, T] current value estimates (with grad).
        old_values: [B, T] value estimates at rollout time.
        returns: [B, T] targets (e.g. from `advantages.gae`).
        mask: [B, T] completion mask (for the stats; `aggregate` masks the loss).
        clip: c >= 0.

    Returns:
        per_token_loss [B, T] and detached stats: vf_clip_frac, the fraction of real
        tokens where the clipped term is the larger (the clip cuts the gradient).
    """
    if clip < 0:
        raise ValueError(f"value clip must be >= 0, got {clip}")
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError("values, old_values, returns, mask must share one [B, T] shape")
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns).pow(2)
    loss_clipped = (clipped_values - returns).pow(2)
    loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    stats = {"vf_clip_frac": _masked_mean((loss_clipped > loss_unclipped).detach(), mask)}
    return loss, stats


# ---------------------------------------------------------------------- reward shaping


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (Sec. 3.4, eq. 13), scaled by `penalty`.

        R(y) = 0                                   if |y| <= max_len - buffer
             = (max_len - buffer - |y|) / buffer   if max_len - buffer < |y| <= max_len
             = -1                                  if |y| > max_len
    times `penalty`; added to the task reward. buffer = 0 is a hard cut at max_len.

    Args:
        lengths: [B] completion lengths in tokens (int).
        max_len: L_max, the generation budget.
        buffer: L_cache, the length of the linear ramp, 0 <= buffer <= max_len.
        penalty: magnitude at and beyond max_len (>= 0).

    Returns:
        [B] float32 penalties in [-penalty, 0].

    Example:
        >>> overlong_penalty(torch.tensor([10, 15, 20]), max_len=20, buffer=10)
        tensor([ 0.0000, -0.5000, -1.0000])
    """
    if max_len <= 0 or not 0 <= buffer <= max_len:
        raise ValueError(f"need max_len > 0 and 0 <= buffer <= max_len, got {max_len}, {buffer}")
    if penalty < 0:
        raise ValueError(f"penalty is a magnitude, must be >= 0, got {penalty}")
    lengths = lengths.to(torch.float32)
    if buffer == 0:
        return torch.where(lengths > max_len, -penalty, 0.0)
    # (start - |y|) clamped to [-buffer, 0]: +0.0 (not -0.0) below the ramp
    start = max_len - buffer
    return torch.clamp(start - lengths, -buffer, 0) * (penalty / buffer)
