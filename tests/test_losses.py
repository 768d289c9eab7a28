"""Losses: hand-worked cases (working in comments), autograd checks, and the
gradient-accumulation equivalence of `aggregate` at the loss level."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    clipped_surrogate,
    gspo_surrogate,
    kl_k1,
    kl_k2,
    kl_k3,
    overlong_penalty,
    value_loss,
)

E = math.e


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------- KL


def test_kl_by_hand():
    log2 = math.log(2)
    logp = torch.tensor([0.0, log2])
    ref = torch.tensor([log2, 0.0])
    # k3 with log r = ref - logp:
    #   [0]: log r = log 2  -> 2 - log 2 - 1 = 1 - log 2
    #   [1]: log r = -log 2 -> 1/2 + log 2 - 1 = log 2 - 1/2
    close(kl_k3(logp, ref), [1 - log2, log2 - 0.5])
    close(kl_k1(logp, ref), [-log2, log2])
    close(kl_k2(logp, ref), [0.5 * log2**2, 0.5 * log2**2])


def test_kl_zero_at_equality_and_nonnegative():
    torch.manual_seed(0)
    logp = torch.randn(4, 7)
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros(4, 7))
    ref = torch.randn(4, 7)
    assert (kl_k3(logp, ref) >= 0).all() and (kl_k2(logp, ref) >= 0).all()


def test_k1_k3_unbiased_exact_expectation():
    # E_{y~p}[k(y)] computed exactly over a 5-token vocabulary equals KL(p || q) for
    # k1 and k3 (Schulman 2020); k2 is biased and must not.
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    logq = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    p = logp.exp()
    kl = (p * (logp - logq)).sum()
    for name in ("k1", "k3"):
        expectation = (p * KL_ESTIMATORS[name](logp, logq)).sum()
        torch.testing.assert_close(expectation, kl, atol=1e-12, rtol=0)
    assert abs((p * kl_k2(logp, logq)).sum() - kl) > 1e-3
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


# ----------------------------------------------------------------- clipped_surrogate


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 5)
    logp = torch.tensor([[1.0, -1.0, 0.0, 1.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0]])
    # ratios [e, 1/e, 1, e, 1/e], clip range [0.8, 1.28]
    #   [0] A=+1, r=e:   min(e, 1.28) = 1.28       -> loss -1.28 (clipped high)
    #   [1] A=+1, r=1/e: min(1/e, 0.8) = 1/e       -> loss -1/e  (A>0 is never clipped low)
    #   [2] A=+1, r=1:                             -> loss -1
    #   [3] A=-1, r=e:   min(-e, -1.28) = -e       -> loss e     (pessimistic, unclipped)
    #   [4] A=-1, r=1/e: min(-1/e, -0.8) = -0.8    -> loss 0.8   (clipped low)
    loss, stats = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    close(loss, [[-1.28, -1 / E, -1.0, E, 0.8]])
    close(stats["clip_low_frac"], 1 / 5)
    close(stats["clip_high_frac"], 1 / 5)
    close(stats["clip_frac"], 2 / 5)
    close(stats["ratio_mean"], (2 * E + 2 / E + 1) / 5)
    assert all(not v.requires_grad for v in stats.values())
    # d loss / d logp = -A * r where unclipped, 0 where clipped
    loss.sum().backward()
    close(logp.grad, [[0.0, -1 / E, -1.0, E, 0.0]])


def test_clipped_surrogate_masked_stats_and_seq_adv():
    old = torch.zeros(1, 5)
    logp = torch.tensor([[1.0, -1.0, 0.0, 1.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the clipped-low token is padding
    _, stats = clipped_surrogate(logp, old, adv, 0.2, 0.28, mask=mask)
    close(stats["clip_low_frac"], 0.0)
    close(stats["clip_high_frac"], 1 / 4)
    close(stats["clip_frac"], 1 / 4)
    close(stats["ratio_mean"], (2 * E + 1 / E + 1) / 4)
    # adv [B] broadcasts over tokens: same as [B, T] ones
    loss_b, _ = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    loss_bt, _ = clipped_surrogate(logp, old, torch.ones(1, 5), 0.2, 0.28)
    assert torch.equal(loss_b, loss_bt)
    with pytest.raises(ValueError, match="adv must be"):
        clipped_surrogate(logp, old, torch.ones(3), 0.2, 0.28)


def test_clip_higher_is_asymmetric():
    # r = 1.25, A = 1: inside [0.8, 1.28] (clip-higher) -> loss -1.25;
    # the symmetric range [0.8, 1.2] clips it -> loss -1.2
    logp, old, adv = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1)
    close(clipped_surrogate(logp, old, adv, 0.2, 0.28)[0], [[-1.25]])
    close(clipped_surrogate(logp, old, adv, 0.2, 0.2)[0], [[-1.2]])


# -------------------------------------------------------------------------------- gspo


def test_gspo_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.2, 0.4, 5.0], [0.0, 0.0, -0.3]])  # 5.0 is padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    # s_0 = exp((0.2 + 0.4) / 2) = e^0.3 = 1.3499 > 1.2, A > 0 -> clipped: loss -1.2 per token
    # s_1 = exp((0 + 0 - 0.3) / 3) = e^-0.1 = 0.9048 in range, A < 0 -> loss e^-0.1 per token
    loss, stats = gspo_surrogate(logp, old, adv, mask, 0.2, 0.2)
    s1 = math.exp(-0.1)
    close(loss[0, :2], [-1.2, -1.2])
    close(loss[1], [s1, s1, s1])
    # stats are token-weighted over the 5 real tokens: 2 tokens clipped high
    close(stats["clip_high_frac"], 2 / 5)
    close(stats["clip_low_frac"], 0.0)
    close(stats["ratio_mean"], (2 * math.exp(0.3) + 3 * s1) / 5)


def test_gspo_gradient_equals_sequence_level_objective():
    torch.manual_seed(0)
    B, T, eps = 6, 5, 0.05
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    old = torch.randn(B, T, dtype=torch.float64) - 2
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.3], dtype=torch.float64)
    logp0 = old + 0.15 * torch.randn(B, T, dtype=torch.float64)

    logp = logp0.clone().requires_grad_()
    per_token, _ = gspo_surrogate(logp, old, adv, mask, eps, eps)
    loss = aggregate(per_token, mask, "grpo", num_sequences=B, num_tokens=int(mask.sum()),
                     max_completion_length=T)
    loss.backward()

    # plain sequence-level GSPO objective: -mean_i min(s_i A_i, clip(s_i) A_i)
    ref_logp = logp0.clone().requires_grad_()
    s = torch.exp(((ref_logp - old) * mask).sum(1) / lengths)
    ref = -torch.minimum(s * adv, s.clamp(1 - eps, 1 + eps) * adv).mean()
    ref.backward()

    clipped = ((s < 1 - eps) & (adv < 0)) | ((s > 1 + eps) & (adv > 0))
    assert clipped.any() and not clipped.all()  # both branches are exercised
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(logp.grad, ref_logp.grad, atol=1e-12, rtol=0)
    assert (logp.grad[~mask.bool()] == 0).all()  # padding gets no gradient


def test_policy_loss_registry():
    assert set(POLICY_LOSSES) == {"clip", "gspo"}
    torch.manual_seed(0)
    logp, old = torch.randn(3, 4), torch.randn(3, 4)
    adv, mask = torch.randn(3), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    loss, stats = POLICY_LOSSES["clip"](logp, old, adv, mask, 0.2, 0.28)
    ref_loss, ref_stats = clipped_surrogate(logp, old, adv, 0.2, 0.28, mask=mask)
    assert torch.equal(loss, ref_loss) and stats.keys() == ref_stats.keys()
    assert all(torch.equal(stats[k], ref_stats[k]) for k in stats)
    assert POLICY_LOSSES["gspo"] is gspo_surrogate


# ---------------------------------------------------------------------------- aggregate

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("grpo", 3.25),  # ((1+2)/2 + (4+5+6)/3) / 2 = (1.5 + 5) / 2
        ("bnpo", 3.6),  # (1+2+4+5+6) / 5 tokens
        ("dapo", 3.6),
        ("dr_grpo", 2.25),  # 18 / (2 sequences * 4 max_completion_length)
    ],
)
def test_aggregate_by_hand(mode, expected):
    out = aggregate(PER_TOKEN, MASK, mode, num_sequences=2, num_tokens=5, max_completion_length=4)
    close(out, expected)


def test_dr_grpo_normalizer_is_constant():
    # drop 2 tokens of row 0: sum (1 + 4+5+6) = 16, normalizer still 2 * 4 = 8 -> 2.0
    # (grpo would change its per-sequence normalizer from 2 to 1)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    sizes = dict(num_sequences=2, num_tokens=4, max_completion_length=4)
    out = aggregate(PER_TOKEN, mask, "dr_grpo", **sizes)
    close(out, 2.0)


def test_aggregate_errors():
    kwargs = dict(num_sequences=2, num_tokens=5, max_completion_length=4)
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dapo', 'dr_grpo'"):
        aggregate(PER_TOKEN, MASK, "mean", **kwargs)
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        aggregate(PER_TOKEN, MASK, "dapo", **{**kwargs, "num_tokens": 0})
    with pytest.raises(ValueError, match="must be equal"):
        aggregate(PER_TOKEN, MASK[:, :2], "dapo", **kwargs)
    assert AGGREGATIONS == ("grpo", "bnpo", "dapo", "dr_grpo")


def _accumulation_case():
    torch.manual_seed(0)
    B, T = 8, 6
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 1])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    weight = torch.randn(B, T, dtype=torch.float64, requires_grad=True)  # leaf
    target = torch.randn(B, T, dtype=torch.float64)
    return mask, weight, target


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_sum_to_full_batch(mode):
    # The gradient-accumulation equivalence: 4 micro-batches of 2 sequences, each
    # normalized with the whole batch's sizes, sum (value and gradient) to the loss
    # of the single batch of 8.
    mask, weight, target = _accumulation_case()
    sizes = dict(num_sequences=8, num_tokens=int(mask.sum()), max_completion_length=6)

    def per_token(rows):
        return (weight[rows] - target[rows]).pow(2) * weight[rows]  # non-linear in the leaf

    full = aggregate(per_token(slice(0, 8)), mask, mode, **sizes)
    (full_grad,) = torch.autograd.grad(full, weight)

    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, 8, 2):
        rows = slice(start, start + 2)
        micro = aggregate(per_token(rows), mask[rows], mode, **sizes)
        micro.backward()  # accumulates into weight.grad, as in training
        total = total + micro.detach()
    torch.testing.assert_close(total, full.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(weight.grad, full_grad, atol=1e-12, rtol=0)


def test_per_micro_batch_normalizer_would_break_equivalence():
    # The failure the test above guards against: normalizing "dapo" by each micro-batch's
    # own token count (then dividing by the 4 steps) is not the full-batch token mean
    # when the micro-batches hold different numbers of tokens.
    mask, weight, target = _accumulation_case()
    per_token = ((weight - target).pow(2) * weight).detach()
    full = aggregate(per_token, mask, "dapo", num_sequences=8, num_tokens=int(mask.sum()),
                     max_completion_length=6)
    naive = sum(
        aggregate(per_token[s : s + 2], mask[s : s + 2], "dapo", num_sequences=2,
                  num_tokens=int(mask[s : s + 2].sum()), max_completion_length=6) / 4
        for s in range(0, 8, 2)
    )
    assert abs(naive - full) > 1e-3


# --------------------------------------------------------------------------- value_loss


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 1.5, 5.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    returns = torch.tensor([[3.0, 1.0, 0.0, 10.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # clip 0.2, clipped V = old + clamp(V - old, -0.2, 0.2):
    #   [0] V=1,   Vc=0.7: (1-3)^2=4,     (0.7-3)^2=5.29  -> 0.5*5.29 = 2.645 (clip active)
    #   [1] V=2,   Vc=2:   (2-1)^2=1,     1               -> 0.5
    #   [2] V=1.5, Vc=1.2: (1.5-0)^2=2.25,(1.2-0)^2=1.44  -> 0.5*2.25 = 1.125
    #   [3] padding: V=5, Vc=0.2: 25, 96.04               -> 48.02 (active, not counted)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, [[2.645, 0.5, 1.125, 48.02]], atol=1e-5)
    close(stats["vf_clip_frac"], 1 / 3)
    assert not stats["vf_clip_frac"].requires_grad
    # gradient: 0 where the clipped term wins (V outside the clip range), else V - R
    (loss * mask).sum().backward()
    close(values.grad, [[0.0, 1.0, 1.5, 0.0]])


# --------------------------------------------------------------------- overlong_penalty


def test_overlong_penalty_by_hand():
    # max_len 20, buffer 8: the ramp starts after 12 tokens
    #   5 -> 0, 12 -> 0, 13 -> -1/8, 16 -> -4/8, 20 -> -1, 25 -> -1 ; times penalty 0.5
    lengths = torch.tensor([5, 12, 13, 16, 20, 25])
    close(overlong_penalty(lengths, 20, 8, penalty=0.5), [0.0, 0.0, -0.0625, -0.25, -0.5, -0.5])
    # buffer 0: hard cut beyond max_len
    close(overlong_penalty(torch.tensor([20, 21]), 20, 0), [0.0, -1.0])


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="buffer <= max_len"):
        overlong_penalty(torch.tensor([1]), 10, 11)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(torch.tensor([1]), 10, 2, penalty=-1.0)
