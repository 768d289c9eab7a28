"""Advantage estimators: pure functions of reward (and value) tensors.

Layout convention: a batch of `P` prompts with `G` completions each is flattened to
`P * G` rows, the `G` completions of one prompt being consecutive (row `p * G + g`).
Token-level tensors are `[B, T]` with a completion mask `[B, T]` (1 = real token, the
real tokens of a row forming a prefix: right padding).

Outcome-level estimators (one scalar advantage per completion, `[P*G]`):
- `group_advantages`: GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2,
  "outcome supervision"): A_i = (r_i - mean(group)) / std(group); Dr. GRPO (Liu et al. 2025,
  "Understanding R1-Zero-Like Training", arXiv:2503.20783, Sec. 3.2) drops the std.
- `rloo_advantages`: REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics",
  arXiv:2402.14740).
- `reinforce_pp_advantages`: REINFORCE++ (Hu 2025, arXiv:2501.03262) global batch whitening.

Token-level estimators (`[B, T]`):
- `kl_penalized_token_rewards` -> `returns_to_go` -> `whiten`: REINFORCE++ with the KL
  penalty in the reward (composed by `reinforce_pp_token_advantages`).
- `gae`: generalized advantage estimation for PPO (Schulman et al. 2016, arXiv:1506.02438).

Where we depart from the papers (and why):
- The group std is the unbiased (Bessel-corrected) one, as in TRL's `GRPOTrainer`
  (`torch.std` default), so that advantages are comparable with TRL runs; the paper
  does not say which. A singleton group (G = 1) has std 0 rather than NaN.
- A group whose rewards are all equal gets advantage exactly 0 (not r - mean, which can
  be a rounding residue of ~1e-8 that the eps division would blow up to ~1e-4).
- `eps` is added to the std (TRL convention, default 1e-4), not to the variance.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")


# ----------------------------------------------------------------------------- helpers


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Check the flat layout and view it as groups.

    Args:
        rewards: [P*G] float rewards.
        group_size: G, completions per prompt.

    Returns:
        [P, G] view of `rewards`.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} elements, not a multiple of group_size={group_size}"
        )
    return rewards.view(-1, group_size)


def _std(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased std (Bessel, n - 1) that is 0 for a single element instead of NaN."""
    n = x.numel() if dim is None else x.shape[dim]
    if dim is None:
        dev = x - x.mean()
        return (dev.pow(2).sum() / max(n - 1, 1)).sqrt()
    dev = x - x.mean(dim=dim, keepdim=True)
    return (dev.pow(2).sum(dim=dim, keepdim=keepdim) / max(n - 1, 1)).sqrt()


def _check_scale(scale: str, valid: tuple[str, ...] = SCALES) -> None:
    if scale not in valid:
        raise ValueError(f"scale must be one of {valid}, got {scale!r}")


def _check_token_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected equal [B, T] shapes, got {shapes}")


# ------------------------------------------------------------------ outcome level [P*G]


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Groups whose G rewards are all equal (so they carry no GRPO learning signal).

    Exact equality (max == min), no tolerance: rewards are usually discrete (0/1
    correctness, format bonuses), identical rewards computed the same way are
    bit-identical, and a tolerance would silently drop groups with small genuine
    differences. DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, Sec. 3.2)
    filters exactly these groups.

    Args:
        rewards: [P*G] rewards, groups of G consecutive completions.
        group_size: G.

    Returns:
        [P] bool, True where the group's rewards are all equal.

    Example:
        >>> zero_std_groups(torch.tensor([1., 1., 0., 1.]), 2)
        tensor([ True, False])
    """
    grouped = _grouped(rewards, group_size)  # [P, G]
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages: A_i = (r_i - mean_group) / (std + eps).

    GRPO outcome supervision (DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2): every token
    of completion i gets A_i = (r_i - mean(r)) / std(r) over the G completions of its
    prompt. `scale` chooses the denominator:

    - "group": std of the completion's own group (GRPO, DAPO, GSPO).
    - "batch": std of all P*G rewards, the mean still per group ("group mean, batch
      std", Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning",
      arXiv:2508.08221; TRL's `scale_rewards="batch"`).
    - "none": no division (Dr. GRPO, arXiv:2503.20783, Sec. 3.2: the std gives
      questions that are too easy or too hard a larger weight).

    Stds are unbiased (n - 1), like TRL's `torch.std`; see the module docstring.
    Groups with all-equal rewards get exactly 0.

    Args:
        rewards: [P*G] rewards, G consecutive completions per prompt.
        group_size: G.
        scale: "group", "batch" or "none".
        eps: added to the std before dividing.

    Returns:
        [P*G] advantages, same dtype as `rewards`.

    Example:
        >>> group_advantages(torch.tensor([1., 0., 5., 5.]), 2, scale="none")
        tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    _check_scale(scale)
    grouped = _grouped(rewards, group_size)  # [P, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "group":
        adv = adv / (_std(grouped, dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (_std(rewards) + eps)
    adv = adv.masked_fill(zero_std_groups(rewards, group_size).unsqueeze(1), 0.0)
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs" (arXiv:2402.14740), the RLOO estimator: each
    sample's baseline is the mean reward of the other k - 1 samples for the same prompt,
    which keeps the estimator unbiased. Algebra:
        r_i - (G * mean - r_i) / (G - 1) = G / (G - 1) * (r_i - mean).

    Args:
        rewards: [P*G] rewards, G consecutive completions per prompt.
        group_size: G >= 2 (a single sample has no "others").

    Returns:
        [P*G] advantages.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    grouped = _grouped(rewards, group_size)  # [P, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    adv = adv * (group_size / (group_size - 1))
    adv = adv.masked_fill(zero_std_groups(rewards, group_size).unsqueeze(1), 0.0)
    return adv.reshape(-1)


def reinforce_pp_advantages(
    rewards: Tensor, group_size: int = 1, scale: str = "batch", eps: float = 1e-4
) -> Tensor:
    """REINFORCE++ outcome advantages: rewards whitened over the whole batch.

    Hu 2025, "REINFORCE++" (arXiv:2501.03262): no critic and no per-prompt baseline; the
    advantage is normalized with the mean and std of the global batch. This is the
    outcome-only form (no KL in the reward, one advantage per completion). With the KL
    penalty in the reward use `reinforce_pp_token_advantages` ([B, T]).

    Args:
        rewards: [B] rewards (B = P*G; groups do not matter here).
        group_size: only checked to divide B, so it fits the `ADVANTAGES` signature.
        scale: "batch" (divide by the batch std + eps) or "none" (only center).
        eps: added to the std before dividing.

    Returns:
        [B] advantages; all zeros when every reward in the batch is equal.
    """
    _check_scale(scale, ("batch", "none"))
    _grouped(rewards, group_size)  # validates layout
    adv = rewards - rewards.mean()
    if scale == "batch":
        adv = adv / (_std(rewards) + eps)
    if rewards.numel() and rewards.amax() == rewards.amin():
        adv = torch.zeros_like(adv)
    return adv


# ------------------------------------------------------------------------ token level


def whiten(
    x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Masked whitening: (x - mean) / sqrt(var + eps) over the real entries.

    The variance is unbiased (n - 1), as in torchtune's / TRL's `masked_var`; one real
    element has variance 0. Masked-out entries of the output are 0 (so whitened
    advantages are 0 on padding).

    Args:
        x: [B, T] or [B].
        mask: same shape as `x`, 1 = real entry; None = all real.
        shift_mean: if False, add the mean back (rescale only).
        eps: added to the variance.

    Returns:
        Same shape as `x`.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    m = mask.to(x.dtype)
    n = m.sum()
    if n == 0:
        raise ValueError("whiten: mask selects no elements")
    mean = (x * m).sum() / n
    var = ((x - mean).pow(2) * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalized_token_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards: -beta * kl on every real token, plus the outcome reward on the last.

    REINFORCE++ (arXiv:2501.03262) and PPO-RLHF (Ouyang et al. 2022) put the KL penalty in
    the reward rather than in the loss: r_t = -beta * KL_t + 1[t = last] * r(x, y).
    `kl` is detached: in the reward it is a constant, not a gradient path.

    Args:
        rewards: [B] outcome rewards.
        kl: [B, T] per-token KL estimate (e.g. `losses.kl_k1`).
        mask: [B, T] completion mask; each row needs at least one real token.
        beta: KL coefficient.

    Returns:
        [B, T] token rewards, 0 on padding.
    """
    _check_token_shapes(kl=kl, mask=mask)
    if rewards.shape != (kl.shape[0],):
        raise ValueError(f"rewards shape {tuple(rewards.shape)} != ({kl.shape[0]},)")
    m = mask.to(kl.dtype)
    empty = (m.sum(dim=1) == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"rows {empty.tolist()} have no real tokens to carry the reward")
    # last real position: argmax of position * mask (masks are right-padded prefixes)
    positions = torch.arange(kl.shape[1], device=kl.device)
    last = (positions * m).argmax(dim=1)  # [B]
    token_rewards = -beta * kl.detach() * m
    token_rewards[torch.arange(kl.shape[0], device=kl.device), last] += rewards.to(kl.dtype)
    return token_rewards


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go: G_t = sum_{k >= t} gamma^(k - t) r_k over real tokens.

    Args:
        token_rewards: [B, T].
        mask: [B, T] completion mask (right padding).
        gamma: discount.

    Returns:
        [B, T] returns, 0 on padding.
    """
    _check_token_shapes(token_rewards=token_rewards, mask=mask)
    m = mask.to(token_rewards.dtype)
    r = token_rewards * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running * m[:, t]
        out[:, t] = running
    return out * m


def reinforce_pp_token_advantages(
    rewards: Tensor, kl: Tensor, mask: Tensor, beta: float, gamma: float = 1.0, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++ token advantages: whiten(returns_to_go(r - beta * KL)) over the batch.

    Hu 2025 (arXiv:2501.03262): A_t = r(x, y) - beta * sum_{k >= t} KL_k, then
    A <- (A - mean) / std over all real tokens of the global batch.

    Args:
        rewards: [B] outcome rewards.
        kl: [B, T] per-token KL (detached inside).
        mask: [B, T] completion mask.
        beta: KL coefficient.
        gamma: discount (1.0 in the paper).
        eps: added to the variance in `whiten`.

    Returns:
        [B, T] advantages, 0 on padding.
    """
    token_rewards = kl_penalized_token_rewards(rewards, kl, mask, beta)
    return whiten(returns_to_go(token_rewards, mask, gamma), mask, eps=eps)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A after a row's last real token taken as 0 (the completion ended:
    terminal state). Vectorized over the batch, one backward loop over T.

    Args:
        rewards: [B, T] token rewards (e.g. from `kl_penalized_token_rewards`).
        values: [B, T] value estimates V(s_t).
        mask: [B, T] completion mask (right padding); padded entries of
            `rewards`/`values` are ignored.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        (advantages [B, T], returns [B, T] = advantages + values), both 0 on padding.
    """
    _check_token_shapes(rewards=rewards, values=values, mask=mask)
    m = mask.to(values.dtype)
    # Zero the padding: V and A after a row's last real token are then 0 (terminal
    # state, nothing to bootstrap from), and non-finite filler cannot leak (0 * nan).
    rewards = rewards.masked_fill(~mask.bool(), 0.0)
    values = values.masked_fill(~mask.bool(), 0.0)
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        adv[:, t] = next_adv
        next_value = values[:, t]
    adv = adv * m
    returns = (adv + values) * m
    return adv, returns


# ---------------------------------------------------------------------------- registry

AdvantageFn = Callable[[Tensor, int, "str | None", float], Tensor]

DEFAULT_SCALE: dict[str, str] = {
    "grpo": "group",
    "dr_grpo": "none",
    "dapo": "group",
    "gspo": "group",
    "rloo": "none",
    "reinforce_pp": "batch",
}


def _group_fn(algo: str) -> AdvantageFn:
    def fn(rewards: Tensor, group_size: int, scale: str | None = None, eps: float = 1e-4) -> Tensor:
        return group_advantages(rewards, group_size, scale or DEFAULT_SCALE[algo], eps)

    fn.__name__ = f"{algo}_advantages"
    fn.__doc__ = f"`group_advantages` with scale defaulting to {DEFAULT_SCALE[algo]!r} ({algo})."
    return fn


def _rloo(rewards: Tensor, group_size: int, scale: str | None = None, eps: float = 1e-4) -> Tensor:
    """`rloo_advantages`; RLOO does not scale, so only scale None / "none" is accepted."""
    _check_scale(scale or "none", ("none",))
    return rloo_advantages(rewards, group_size)


def _reinforce_pp(
    rewards: Tensor, group_size: int, scale: str | None = None, eps: float = 1e-4
) -> Tensor:
    """`reinforce_pp_advantages` with scale defaulting to "batch"."""
    return reinforce_pp_advantages(rewards, group_size, scale or DEFAULT_SCALE["reinforce_pp"], eps)


# Uniform signature: fn(rewards [P*G], group_size, scale=None, eps=1e-4) -> [P*G].
# scale=None means the algorithm's own default (DEFAULT_SCALE); an explicit scale
# overrides it. PPO uses `gae` instead; REINFORCE++ with a KL reward uses
# `reinforce_pp_token_advantages` ([B, T]).
ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": _group_fn("grpo"),
    "dr_grpo": _group_fn("dr_grpo"),
    "dapo": _group_fn("dapo"),
    "gspo": _group_fn("gspo"),
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
}
