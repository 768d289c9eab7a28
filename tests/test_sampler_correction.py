"""The sampler is not the learner: the sampler's own log-probs, the mismatch metrics, token-level
truncated importance sampling (Yao et al. 2025), and the bias-corrected KL (DeepSeek-V3.2).

Hand-worked cases on tensors first, then the sampler's log-probs against the learner's on a
tiny model, then trainer steps (an identical sampler, a bf16 sampler, TIS on the toy task).
"""

from __future__ import annotations

import math

import pytest
import torch

import grpo
from grpo.fastgen import FastPolicy
from grpo.losses import mismatch_sums, objective, truncated_is_weights
from grpo.model import completion_logprobs
from grpo.rollout import generate_rollout, sample_next_token
from grpo.testing import chat_prompt, tiny_model, tiny_tokenizer
from test_trainer import make_trainer, read_metrics

NORMS = dict(num_sequences=2, num_tokens=5, max_completion_length=4)


# ---------------------------------------------------------------------------- sampled log-probs
def test_sampled_logprob_is_that_of_the_distribution_drawn_from():
    # probs [0.5, 0.3, 0.2]: u 0.1 -> token 0, u 0.6 -> token 1, u 0.9 -> token 2.
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(3, -1)
    u = torch.tensor([0.1, 0.6, 0.9])
    ids, logp = sample_next_token(logits, temperature=1.0, u=u)
    assert ids.tolist() == [0, 1, 2]
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.3, 0.2]).log(), rtol=0, atol=1e-6)
    # top_p 0.8 keeps {0.5, 0.3} (mass above token 2 is 0.8, not < 0.8): renormalized 0.625 / 0.375,
    # and u 0.9 now lands on token 1 (0.9 > 0.625).
    ids, logp = sample_next_token(logits, temperature=1.0, top_p=0.8, u=u)
    assert ids.tolist() == [0, 0, 1]
    torch.testing.assert_close(logp, torch.tensor([0.625, 0.625, 0.375]).log(), rtol=0, atol=1e-6)
    # top_k 1: a point mass on the argmax, log-prob 0.
    _, logp = sample_next_token(logits, temperature=1.0, top_k=1, u=u)
    assert torch.equal(logp, torch.zeros(3))
    # temperature 2: the log-prob of softmax(logits / 2), what the learner computes at T = 2.
    ids, logp = sample_next_token(logits, temperature=2.0, u=u)
    torch.testing.assert_close(logp, torch.log_softmax(logits / 2, -1).gather(-1, ids[:, None]).squeeze(-1),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_rollout_records_the_learners_logprobs_when_it_samples_itself(decode):
    # The model samples and then scores its own rollout with a full forward: the same
    # distribution, computed once incrementally (KV cache) and once in one pass, so the two
    # agree to float32 rounding; padding is 0. A third of the vocabulary stops a row, so the
    # rows end at different lengths.
    model, tok = tiny_model(), tiny_tokenizer()
    texts = [chat_prompt(tok, "hi"), chat_prompt(tok, "a longer question")]
    r = generate_rollout(model, tok, texts, group_size=3, max_prompt_length=64, max_new_tokens=12,
                         temperature=0.7, top_p=1.0, top_k=0, generator=None, prompt_seeds=[1, 2],
                         decode=decode, eos_token_ids=list(range(4, 40)))
    assert r.sampler_logp.shape == r.completion_ids.shape
    assert bool((r.sampler_logp[r.completion_mask == 0] == 0).all())
    assert int(r.completion_lengths.min()) < int(r.completion_lengths.max())  # ragged rows
    learner = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                  temperature=0.7)
    torch.testing.assert_close(r.sampler_logp, learner * r.completion_mask, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- TIS and mismatch on tensors
def test_truncated_is_weights_by_hand():
    # C = 2: log-ratios [0, log 1.5, log 3, log 0.5] -> ratios [1, 1.5, 3, 0.5] -> [1, 1.5, 2, 0.5].
    old = torch.tensor([[0.0, math.log(1.5), math.log(3.0), math.log(0.5)]])
    sampler = torch.zeros(1, 4)
    torch.testing.assert_close(truncated_is_weights(old, sampler, 2.0), torch.tensor([[1.0, 1.5, 2.0, 0.5]]))
    # an identical sampler: every weight exactly 1, no gradient
    x = torch.randn(3, 5, requires_grad=True)
    w = truncated_is_weights(x, x.detach(), 2.0)
    assert torch.equal(w, torch.ones(3, 5)) and not w.requires_grad


def test_mismatch_sums_by_hand():
    # log r = old - sampler = [log 2, 0 | log 3, (masked)]: k3 = r - log r - 1 =
    # [1 - log 2, 0 | 2 - log 3]; |log r| = [log 2, 0 | log 3]; ratio > 2.5: only r = 3.
    old = torch.tensor([[math.log(2.0), 0.0], [math.log(3.0), 5.0]])
    sampler = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    s = mismatch_sums(old, sampler, mask, cap=2.5)
    assert s["kl"] == pytest.approx(1 - math.log(2) + 2 - math.log(3), abs=1e-6)
    assert s["abs_diff"] == pytest.approx(math.log(2) + math.log(3), abs=1e-6)
    assert (s["truncated"], s["tokens"]) == (1.0, 3.0)
    assert s["ratio_max"] == pytest.approx(3.0)  # the masked 5.0 (ratio e^5) is not counted


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(2, 4, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(2, 4, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(2, 4, generator=g)
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    return logp, old, ref, adv, mask


def _objective(logp, old, adv, mask, **kw):
    args = dict(policy_loss="clip", aggregation="bnpo", norms=NORMS, eps_low=0.2, eps_high=0.2) | kw
    return objective(logp, old, adv, mask, **args)[0]


@pytest.mark.parametrize("policy_loss", ["clip", "gspo"])
def test_identical_sampler_gives_the_uncorrected_loss_exactly(policy_loss):
    logp, old, ref, adv, mask = _inputs()
    ones = truncated_is_weights(old, old, 2.0)
    plain = _objective(logp, old, adv, mask, policy_loss=policy_loss, ref_logp=ref, beta=0.1)
    corrected = _objective(logp, old, adv, mask, policy_loss=policy_loss, ref_logp=ref, beta=0.1, is_weights=ones)
    assert torch.equal(plain, corrected)
    g1, = torch.autograd.grad(plain, logp)
    g2, = torch.autograd.grad(corrected, logp)
    assert torch.equal(g1, g2)


def test_tis_weights_scale_each_tokens_policy_gradient_not_the_kl():
    # d loss / d logp_t = (w_t * d surrogate_t + beta * d kl_t) / num_tokens on kept tokens:
    # the weights multiply the surrogate's gradient, the KL's is left alone.
    logp, old, ref, adv, mask = _inputs(1)
    w = torch.tensor([[0.5, 1.0, 2.0, 2.0], [1.5, 0.25, 1.0, 1.0]])
    surrogate, = torch.autograd.grad(_objective(logp, old, adv, mask), logp)
    kl_only, = torch.autograd.grad(_objective(logp, old, torch.zeros(2), mask, ref_logp=ref, beta=0.3), logp)
    both, = torch.autograd.grad(_objective(logp, old, adv, mask, ref_logp=ref, beta=0.3, is_weights=w), logp)
    torch.testing.assert_close(both, w * surrogate + kl_only, rtol=1e-6, atol=1e-7)


def test_bias_corrected_kl_is_the_ratio_times_k3():
    # kl_t = exp(logp - old) * (exp(ref - logp) - (ref - logp) - 1), with the ratio's gradient (TRL).
    logp, old, ref, adv, mask = _inputs(2)
    got = _objective(logp, old, torch.zeros(2), mask, ref_logp=ref, beta=1.0, bias_corrected_kl=True)
    lr = ref - logp
    by_hand = ((torch.exp(logp - old) * (torch.exp(lr) - lr - 1)) * mask).sum() / NORMS["num_tokens"]
    torch.testing.assert_close(got, by_hand)
    g_got, = torch.autograd.grad(got, logp)
    g_hand, = torch.autograd.grad(by_hand, logp)
    torch.testing.assert_close(g_got, g_hand)
    plain = _objective(logp, old, torch.zeros(2), mask, ref_logp=ref, beta=1.0)
    assert not torch.allclose(got, plain)  # the ratio is not 1 here, so the forms differ


def test_bias_corrected_kl_needs_a_kl_term_in_the_loss():
    with pytest.raises(grpo.ConfigError, match="use_bias_correction_kl=true.*beta=0.0"):
        grpo.GRPOConfig(use_bias_correction_kl=True, beta=0.0)
    with pytest.raises(grpo.ConfigError, match="kl_in_reward=True"):
        grpo.GRPOConfig(use_bias_correction_kl=True, beta=0.1, algorithm="ppo")


def test_sampler_correction_default_and_bad_values():
    assert grpo.GRPOConfig().sampler_correction == "tis"  # fast_rollout: a separate copy samples
    assert grpo.GRPOConfig(fast_rollout=False).sampler_correction == "none"
    assert grpo.GRPOConfig(sampler_correction="none").sampler_correction == "none"  # a value, not "unset"
    with pytest.raises(grpo.ConfigError, match="sampler_correction='is'.*tis, none"):
        grpo.GRPOConfig(sampler_correction="is")
    with pytest.raises(grpo.ConfigError, match="sampler_correction_cap=0.0 must be > 0"):
        grpo.GRPOConfig(sampler_correction_cap=0.0)
    with pytest.raises(grpo.ConfigError, match="sampler_correction_cap=inf is not a finite number"):
        grpo.GRPOConfig(sampler_correction_cap=float("inf"))


# ---------------------------------------------------------------------------- in the trainer
def test_bf16_sampler_is_measured_and_corrected_by_capped_ratios(tmp_path):
    # A bf16 fast copy samples, the float32 PEFT model learns: the distributions differ (KL > 0),
    # and the loss of the step equals the hand-computed TIS loss, each token's surrogate
    # weighted by min(exp(old - sampler), C).
    trainer = make_trainer(tmp_path, max_steps=1, sampler_correction_cap=1.01)
    trainer.fast_policy = FastPolicy(trainer.model, dtype=torch.bfloat16)
    rows, seeds = trainer.draw(trainer.config.prompts_per_step)
    rollout = trainer.generate(rows, seeds)
    rewards, _ = trainer.score(rows, rollout)
    mask = rollout.completion_mask.float()
    adv, _ = trainer.advantages(grpo.algorithms.AdvantageInputs(rewards, rollout.completion_mask))
    stats = trainer.accumulate_gradients(rollout, adv, mask, None, None)
    with torch.no_grad():
        old = torch.cat([trainer.logprobs(rollout, mb) for mb in trainer.micro_batches(mask.shape[0])])
    ratio = torch.exp(old - rollout.sampler_logp)
    # with ratio 1 in the surrogate (num_iterations 1), token loss = -w_t * A_i; grpo aggregation
    w = ratio.clamp(max=1.01)
    by_hand = ((-w * adv[:, None] * mask).sum(-1) / mask.sum(-1)).sum() / mask.shape[0]
    assert stats["loss"] == pytest.approx(float(by_hand), rel=1e-4, abs=1e-6)
    assert stats["mismatch/kl"] > 1e-6
    real = mask.bool()
    assert stats["mismatch/ratio_max"] == pytest.approx(float(ratio[real].max()), rel=1e-4)
    assert stats["mismatch/truncated_frac"] == pytest.approx(float((ratio[real] > 1.01).float().mean()), abs=1e-6)
    assert 0 < stats["mismatch/truncated_frac"] < 1


def test_float32_sampler_mismatch_is_rounding_and_metrics_are_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    m = read_metrics(tmp_path / "run")[0]
    assert {"mismatch/kl", "mismatch/logp_abs_diff_mean", "mismatch/ratio_max", "mismatch/truncated_frac"} <= set(m)
    assert 0 <= m["mismatch/kl"] < 1e-8 and m["mismatch/logp_abs_diff_mean"] < 1e-4
    assert m["mismatch/truncated_frac"] == 0 and m["mismatch/ratio_max"] < 1.001


def test_toy_task_learns_with_tis_on_a_bf16_sampler(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12)
    assert trainer.config.sampler_correction == "tis"
    trainer.fast_policy = FastPolicy(trainer.model, dtype=torch.bfloat16)
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    rewards = [m["reward"] for m in metrics]
    assert rewards[0] < 0.3 and sum(rewards[-2:]) / 2 >= 0.9, rewards
    assert all(m["mismatch/kl"] > 0 for m in metrics)


def test_a_bf16_fast_copy_of_a_float32_policy_builds_with_every_weight_its_own():
    # Regression: copies were cached by the id of a temporary (`param.detach()`), which Python
    # reuses once it is freed, so a layer could receive another layer's weight (a shape error,
    # or worse, a silent swap where the shapes agree).
    trainer_model = grpo.Trainer(tiny_model(), tiny_tokenizer(), [lambda prompts, completions, **kw: [0.0] * len(prompts)],
                                 [{"prompt": "x"}], grpo.GRPOConfig(output_dir="unused", lora_r=2)).model
    fast = FastPolicy(trainer_model, dtype=torch.bfloat16).refresh()
    base = trainer_model.get_base_model()
    for name, p in fast.named_parameters():
        src = base.get_submodule(name.rsplit(".", 1)[0])
        src = getattr(src, "base_layer", src)
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), getattr(src, name.rsplit(".", 1)[1]).detach().float(),
                                   rtol=2 ** -8, atol=0)  # bf16 keeps 8 significant bits; LoRA B is 0
