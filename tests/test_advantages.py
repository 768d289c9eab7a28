"""Advantage estimators: hand-worked cases (working in comments) and GAE vs a slow reference."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.advantages import (
    ADVANTAGES,
    DEFAULT_SCALE,
    gae,
    group_advantages,
    kl_penalized_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_token_advantages,
    returns_to_go,
    rloo_advantages,
    whiten,
    zero_std_groups,
)

EPS = 1e-4
# Two groups of three: P = 2, G = 3.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
# group 0: mean 2, deviations [-1, 0, 1], unbiased var (1 + 0 + 1) / 2 = 1, std 1
# group 1: mean 1, deviations [-1, -1, 2], unbiased var (1 + 1 + 4) / 2 = 3, std sqrt(3)
DEVIATIONS = torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------ group_advantages


def test_group_scale_by_hand():
    expected = torch.tensor(
        [-1 / (1 + EPS), 0.0, 1 / (1 + EPS)]
        + [-1 / (math.sqrt(3) + EPS), -1 / (math.sqrt(3) + EPS), 2 / (math.sqrt(3) + EPS)]
    )
    close(group_advantages(REWARDS, 3, scale="group"), expected)


def test_batch_scale_by_hand():
    # batch of 6: mean 1.5, deviations [-.5, .5, 1.5, -1.5, -1.5, 1.5],
    # squares sum to .25 + .25 + 4 * 2.25 = 9.5, unbiased var 9.5 / 5 = 1.9.
    # The mean stays per group: numerators are the group deviations.
    close(group_advantages(REWARDS, 3, scale="batch"), DEVIATIONS / (math.sqrt(1.9) + EPS))


def test_none_scale_by_hand():
    # Dr. GRPO: only the group mean is subtracted.
    close(group_advantages(REWARDS, 3, scale="none"), DEVIATIONS)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_zero_std_group_gets_exact_zeros(scale, eps):
    # 0.1 is inexact in float32: mean(0.1, 0.1, 0.1) may differ from 0.1 by rounding,
    # and with eps = 0 the group std is 0, so without special care this is 0/0 = NaN.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 3, scale=scale, eps=eps)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3:] != 0).all()


def test_single_sample_groups_give_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0]), 1, scale="group")
    assert torch.equal(adv, torch.zeros(3))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        group_advantages(REWARDS, 3, scale="std")
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(REWARDS.view(2, 3), 3)


def test_zero_std_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert zero_std_groups(rewards, 3).tolist() == [True, False, True]
    # exact equality: a genuine difference of 1e-6 is a signal, not noise
    assert zero_std_groups(torch.tensor([1.0, 1.0 + 1e-6]), 2).tolist() == [False]


# ------------------------------------------------------------------------------ rloo


def test_rloo_by_hand():
    # group 0: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # group 1: 0 - (0+3)/2 = -1.5 (twice), 3 - (0+0)/2 = 3
    close(rloo_advantages(REWARDS, 3), torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))


def test_rloo_errors_and_zero_group():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(REWARDS, 1)
    assert torch.equal(rloo_advantages(torch.full((4,), 0.1), 2), torch.zeros(4))


# ---------------------------------------------------------------------- reinforce_pp


def test_reinforce_pp_by_hand():
    # batch mean 1.5, unbiased std sqrt(1.9) (see test_batch_scale_by_hand)
    expected = (REWARDS - 1.5) / (math.sqrt(1.9) + EPS)
    close(reinforce_pp_advantages(REWARDS), expected)
    close(reinforce_pp_advantages(REWARDS, scale="none"), REWARDS - 1.5)
    assert torch.equal(reinforce_pp_advantages(torch.full((4,), 0.3)), torch.zeros(4))
    with pytest.raises(ValueError, match="'batch', 'none'"):
        reinforce_pp_advantages(REWARDS, scale="group")


def test_kl_penalized_token_rewards_by_hand():
    rewards = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.6, 0.7]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # -0.5 * kl on real tokens; the reward lands on the last real token:
    # row 0: [-0.05, -0.10, -0.15 + 1] ; row 1: [-0.25 - 1, 0, 0]
    out = kl_penalized_token_rewards(rewards, kl, mask, beta=0.5)
    close(out, torch.tensor([[-0.05, -0.10, 0.85], [-1.25, 0.0, 0.0]]))
    assert not out.requires_grad  # the KL in the reward is a constant
    with pytest.raises(ValueError, match=r"rows \[1\] have no real tokens"):
        kl_penalized_token_rewards(rewards, kl.detach(), torch.tensor([[1, 1, 1], [0, 0, 0]]), 0.5)


def test_returns_to_go_by_hand():
    token_rewards = torch.tensor([[-0.05, -0.10, 0.85], [-1.25, 99.0, 99.0]])  # 99: padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # gamma 0.5, row 0: G2 = 0.85, G1 = -0.1 + 0.5 * 0.85 = 0.325, G0 = -0.05 + 0.5 * 0.325 = 0.1125
    out = returns_to_go(token_rewards, mask, gamma=0.5)
    close(out, torch.tensor([[0.1125, 0.325, 0.85], [-1.25, 0.0, 0.0]]))


def test_reinforce_pp_token_advantages_whitened_over_real_tokens():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = reinforce_pp_token_advantages(torch.randn(3), torch.rand(3, 4), mask, beta=0.1)
    real = adv[mask.bool()]
    close(real.mean(), torch.tensor(0.0))
    close(real.std(), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(adv[~mask.bool()], torch.zeros(5))


# ---------------------------------------------------------------------------- whiten


def test_whiten_masked_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # real entries 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + .25 + .25 + 2.25) / 3 = 5/3
    scale = 1 / math.sqrt(5 / 3 + 1e-8)
    expected = torch.tensor([[-1.5, -0.5, 0.0], [0.5, 1.5, 0.0]]) * scale
    close(whiten(x, mask), expected)
    close(whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)


def test_whiten_1d_and_errors():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    close(whiten(x), (x - 2.5) / math.sqrt(5 / 3 + 1e-8))
    with pytest.raises(ValueError, match="no elements"):
        whiten(x, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        whiten(x, torch.ones(3))


# ------------------------------------------------------------------------------- gae


def gae_reference(rewards, values, mask, gamma, lam):
    """Slow, obvious GAE: one python loop per sequence over its real tokens only."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    returns = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        length = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1].item() if t + 1 < length else 0.0  # terminal after last
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
            returns[b, t] = running + values[b, t].item()
    return adv, returns


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 9.0]])  # 9 and 7 are padding filler
    values = torch.tensor([[0.5, 0.2, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    # gamma 0.9, lam 0.8
    # t=1 (last real): delta = 1 + 0.9 * 0 - 0.2 = 0.8 ; A1 = 0.8
    # t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32 ; A0 = -0.32 + 0.9 * 0.8 * 0.8 = 0.256
    # returns = A + V = [0.756, 1.0, 0]
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, torch.tensor([[0.256, 0.8, 0.0]]))
    close(ret, torch.tensor([[0.756, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_reference_on_ragged_masks(gamma, lam):
    torch.manual_seed(1)
    B, T = 7, 9
    lengths = torch.tensor([0, 1, 2, 5, 9, 9, 3])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()  # [B, T] right padding
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    # garbage (and NaN) on padding must not leak into real positions
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask.bool(), values, torch.full_like(values, float("nan")))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-12, rtol=0)


# -------------------------------------------------------------------------- registry


def test_registry():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "dapo", "rloo", "gspo", "reinforce_pp"}
    assert set(DEFAULT_SCALE) == set(ADVANTAGES)
    grpo = group_advantages(REWARDS, 3, "group", EPS)
    for name in ("grpo", "dapo", "gspo"):
        close(ADVANTAGES[name](REWARDS, 3, None, EPS), grpo)
    close(ADVANTAGES["dr_grpo"](REWARDS, 3, None, EPS), DEVIATIONS)
    # an explicit scale overrides the algorithm's default
    close(ADVANTAGES["dr_grpo"](REWARDS, 3, "group", EPS), grpo)
    close(ADVANTAGES["rloo"](REWARDS, 3, None, EPS), rloo_advantages(REWARDS, 3))
    close(ADVANTAGES["reinforce_pp"](REWARDS, 3, None, EPS), reinforce_pp_advantages(REWARDS))
    with pytest.raises(ValueError, match="'none'"):
        ADVANTAGES["rloo"](REWARDS, 3, "group", EPS)
