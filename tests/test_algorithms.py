"""The algorithm registry (grpo/algorithms.py), the PPO critic (grpo/critic.py), DAPO's dynamic
sampling and overlong shaping, and learning on the toy task for every algorithm.

The toy task and `make_trainer` come from tests/test_trainer.py: the reward is the fraction
of digits in an 8-character completion (~0.04 for the random tiny model).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import grpo
from grpo.advantages import ADVANTAGES, reinforce_pp_token_advantages, whiten
from grpo.algorithms import (
    ALGORITHMS,
    AdvantageInputs,
    fill_batch,
    informative_groups,
    ppo_advantage,
    reinforce_pp_advantage,
    reward_kl,
    shaped_rewards,
)
from grpo.config import ALGORITHM_DEFAULTS, GRPOConfig
from grpo.config import ALGORITHMS as CONFIG_ALGORITHMS
from grpo.critic import CRITIC, Critic
from grpo.model import attach_adapters, completion_logprobs
from grpo.testing import tiny_model, tiny_tokenizer
from tests.test_trainer import PROMPTS, digit_fraction, lora_state, make_trainer, read_metrics


def small_config(**overrides) -> GRPOConfig:
    return GRPOConfig(**{"num_generations": 2, "batch_size": 4, "micro_batch_size": 2, **overrides})


# ---------------------------------------------------------------------------- registry and config
def test_registry_config_and_defaults_agree():
    assert set(ALGORITHMS) == set(CONFIG_ALGORITHMS) == set(ALGORITHM_DEFAULTS)
    assert [name for name, a in ALGORITHMS.items() if a.uses_critic] == ["ppo"]
    assert ALGORITHMS["gspo"].policy_loss == "gspo"
    ppo, dapo, grpo_cfg = GRPOConfig(algorithm="ppo"), GRPOConfig(algorithm="dapo"), GRPOConfig()
    assert (ppo.kl_in_reward, ppo.scale_rewards, ppo.loss_type) == (True, "batch", "bnpo")
    assert (dapo.dynamic_sampling, dapo.overlong_penalty, dapo.overlong_buffer) == (True, 1.0, 256 // 5)
    assert (grpo_cfg.kl_in_reward, grpo_cfg.dynamic_sampling, grpo_cfg.overlong_penalty) == (False, False, 0.0)
    assert GRPOConfig(algorithm="dapo", dynamic_sampling=False).dynamic_sampling is False  # explicit wins


def test_config_rejects_scales_the_advantage_cannot_use():
    with pytest.raises(grpo.ConfigError, match="scale_rewards='group' does not fit algorithm=rloo: choose one of none"):
        GRPOConfig(algorithm="rloo", scale_rewards="group")
    with pytest.raises(grpo.ConfigError, match="does not fit algorithm=reinforce_pp: choose one of batch, none"):
        GRPOConfig(algorithm="reinforce_pp", scale_rewards="group")
    with pytest.raises(grpo.ConfigError, match="does not fit algorithm=ppo"):
        GRPOConfig(algorithm="ppo", scale_rewards="none")
    for name in ALGORITHMS:  # every algorithm's own default passes its own check
        GRPOConfig(algorithm=name)


def test_ppo_needs_no_groups_but_grpo_does():
    assert GRPOConfig(algorithm="ppo", num_generations=1, batch_size=4, micro_batch_size=4).prompts_per_step == 4
    with pytest.raises(grpo.ConfigError, match="algorithm=grpo needs at least 2 completions.*ppo"):
        GRPOConfig(num_generations=1, batch_size=4, micro_batch_size=4)
    with pytest.raises(grpo.ConfigError, match="dynamic_sampling"):
        GRPOConfig(algorithm="ppo", num_generations=1, batch_size=4, micro_batch_size=4, dynamic_sampling=True)
    with pytest.raises(grpo.ConfigError, match="overlong_buffer=300 must be in"):
        GRPOConfig(overlong_buffer=300)


# ---------------------------------------------------------------------------- advantage functions by hand
def test_reward_kl_is_k1_of_the_sampling_policy():
    old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    inputs = AdvantageInputs(torch.tensor([1.0]), torch.ones(1, 2), old, ref)
    torch.testing.assert_close(reward_kl(inputs, 0.1), torch.tensor([[0.5, -1.0]]))  # logp - ref_logp
    assert torch.equal(reward_kl(inputs, 0.0), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="old_logp"):
        reward_kl(AdvantageInputs(torch.tensor([1.0]), torch.ones(1, 2), None, ref), 0.1)


def test_ppo_advantage_by_hand():
    # Two sequences, T = 3; row 1 has 2 real tokens. beta = 0.5, k1 KL = old - ref:
    #   row 0: kl = [0.2, 0, 0.4] -> token rewards [-0.1, 0, -0.2 + 1] = [-0.1, 0, 0.8]
    #   row 1: kl = [0, 0.2, *]   -> token rewards [0, -0.1 + 0] = [0, -0.1]  (reward 0 at t = 1)
    # gamma = lam = 1, values = 0: A_t = return-to-go: row 0 [0.7, 0.8, 0.8], row 1 [-0.1, -0.1].
    cfg = small_config(algorithm="ppo", beta=0.5, gamma=1.0, lam=1.0)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    old = torch.tensor([[0.2, 0.0, 0.4], [0.0, 0.2, 9.0]])
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0]), mask, old, torch.zeros(2, 3), torch.zeros(2, 3))
    adv, returns = ppo_advantage(inputs, cfg)
    expected_returns = torch.tensor([[0.7, 0.8, 0.8], [-0.1, -0.1, 0.0]])
    torch.testing.assert_close(returns, expected_returns)
    # whitened over the 5 real tokens: mean 0.42, unbiased var = (0.28^2 + 2 * 0.38^2 + 2 * 0.52^2) / 4
    mean, var = 0.42, (0.28**2 + 2 * 0.38**2 + 2 * 0.52**2) / 4
    expected = (expected_returns - mean) / math.sqrt(var + 1e-8) * mask
    torch.testing.assert_close(adv, expected)
    # kl_in_reward off: the same without the KL terms (returns 1 and 0 everywhere)
    _, returns = ppo_advantage(inputs, small_config(algorithm="ppo", beta=0.5, lam=1.0, kl_in_reward=False))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1, 1], [0, 0, 0]]))


def test_ppo_advantage_uses_the_values():
    # gamma = 1, lam = 0 (one-step TD): A_t = r_t + V_{t+1} - V_t, V after the end = 0.
    # rewards [0, 1] at t = 0, 1 (beta = 0), values [0.25, 0.5] -> A = [0.25, 0.5], returns = A + V = [0.5, 1].
    cfg = small_config(algorithm="ppo", beta=0.0, gamma=1.0, lam=0.0)
    inputs = AdvantageInputs(torch.tensor([1.0]), torch.ones(1, 2), values=torch.tensor([[0.25, 0.5]]))
    adv, returns = ppo_advantage(inputs, cfg)
    torch.testing.assert_close(returns, torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(adv, whiten(torch.tensor([[0.25, 0.5]])))
    with pytest.raises(ValueError, match="values"):
        ppo_advantage(AdvantageInputs(torch.tensor([1.0]), torch.ones(1, 2)), cfg)


def test_reinforce_pp_puts_the_kl_in_the_reward_only_when_asked():
    g = torch.Generator().manual_seed(0)
    rewards, mask = torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.ones(4, 3)
    old, ref = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    inputs = AdvantageInputs(rewards, mask, old, ref)
    adv, returns = reinforce_pp_advantage(inputs, small_config(algorithm="reinforce_pp", beta=0.1))
    assert returns is None and adv.shape == (4, 3)
    torch.testing.assert_close(adv, reinforce_pp_token_advantages(rewards, old - ref, mask, 0.1))
    outcome, _ = reinforce_pp_advantage(inputs, small_config(algorithm="reinforce_pp", beta=0.1, kl_in_reward=False))
    torch.testing.assert_close(outcome, ADVANTAGES["reinforce_pp"](rewards, 2, "batch", 1e-4))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "rloo", "gspo"])
def test_outcome_algorithms_use_the_advantages_registry(name):
    rewards = torch.tensor([1.0, 0.0, 0.25, 0.75])
    cfg = small_config(algorithm=name)
    adv, returns = ALGORITHMS[name].advantage(AdvantageInputs(rewards, torch.ones(4, 2)), cfg)
    assert returns is None
    torch.testing.assert_close(adv, ADVANTAGES[name](rewards, 2, cfg.scale_rewards, cfg.adv_eps))


# ---------------------------------------------------------------------------- DAPO pieces by hand
def test_shaped_rewards_by_hand():
    # max_len 10, buffer 4: the ramp starts after 6 tokens; 8 tokens -> -(8 - 6) / 4 * 0.5 = -0.25
    cfg = small_config(algorithm="dapo", max_completion_length=10, overlong_buffer=4, overlong_penalty=0.5)
    shaped = shaped_rewards(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([6, 8, 10]), cfg)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 0.75, -0.5]))
    off = small_config(max_completion_length=10)
    assert torch.equal(shaped_rewards(torch.tensor([1.0]), torch.tensor([10]), off), torch.tensor([1.0]))


def test_informative_groups_and_fill_batch():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [False, True, False]
    assert fill_batch([1, 4], [0, 2, 3], 3) == [1, 4, 0]  # informative first, then the spares in order
    assert fill_batch([1, 4, 5], [0], 2) == [1, 4]
    with pytest.raises(ValueError, match="only 2 groups drawn, 3 needed"):
        fill_batch([1], [0], 3)


def parity_reward(prompts, completions, **columns):
    """Informative only for odd prompts: q0, q2, ... get a constant 0; q1, q3, ... the digit fraction."""
    fractions = digit_fraction(prompts, completions)
    return [f if int(p.split("q")[1].split("<")[0]) % 2 else 0.0 for p, f in zip(prompts, fractions)]


def test_dynamic_sampling_keeps_informative_groups_and_counts_draws(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path / "run"), algorithm="dapo", num_generations=4, batch_size=16,
                        micro_batch_size=8, max_completion_length=8, beta=0.0, max_resample_rounds=8,
                        overlong_penalty=0.0, progress_bar=False, log_completions_steps=0, save_steps=0)
    trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), [parity_reward], PROMPTS, config)
    rows, rollout, rewards, per_func, metrics = trainer.sample_batch()
    # half the prompts are uninformative: 4 groups need at least 8 drawn, i.e. a resampling round
    assert metrics["resample_rounds"] >= 1 and metrics["groups_drawn"] >= 8
    assert metrics["groups_drawn"] == trainer.state.data_index  # every drawn prompt came from the stream
    assert len(rows) == 4 and rollout.completion_ids.shape[0] == 16 == rewards.numel() == per_func.shape[0]
    assert all(int(r["prompt"].split("q")[1].split("<")[0]) % 2 == 1 for r in rows)
    assert informative_groups(rewards, 4).all()
    assert rollout.prompt_indices.tolist() == [i // 4 for i in range(16)]
    # rewards, texts and rows stay aligned after the selection
    torch.testing.assert_close(rewards, torch.tensor(parity_reward(
        [r["prompt"] for r in rows for _ in range(4)], rollout.completion_texts), dtype=rewards.dtype))
    # with no resampling allowed the uninformative groups fill the batch
    trainer.config.max_resample_rounds = 0
    _, _, rewards, _, metrics = trainer.sample_batch()
    assert metrics["resample_rounds"] == 0 and metrics["groups_drawn"] == 4
    assert not informative_groups(rewards, 4).all()


# ---------------------------------------------------------------------------- the critic
def critic_setup():
    cfg = small_config(algorithm="ppo", lora_r=4)
    model = attach_adapters(tiny_model(), cfg)
    torch.manual_seed(0)
    return model, Critic(model, cfg)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, 100, (3, 5), generator=g)
    prompt_mask = torch.ones(3, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    completion_ids = torch.randint(4, 100, (3, 4), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_critic_values_shape_zero_init_and_padding():
    model, critic = critic_setup()
    with critic.active():
        values = critic.values(*batch())
    assert values.shape == (3, 4) and torch.equal(values, torch.zeros(3, 4))  # zero head at init
    torch.nn.init.normal_(critic.head.weight, std=1.0)
    with critic.active():
        values = critic.values(*batch())
    assert (values[1, 2:] == 0).all() and (values[2, 1:] == 0).all() and (values[0] != 0).all()
    assert model.active_adapter == "default"  # the policy is back on after the context
    with pytest.raises(RuntimeError, match="critic.active"):
        critic.values(*batch())


def test_critic_does_not_touch_the_policy():
    """Adding and training the critic adapter leaves the policy's log-probs bit-identical,
    and the critic's parameters are not among the policy's trainable ones."""
    model, critic = critic_setup()
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch()
    before = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    optimizer = torch.optim.SGD(critic.parameters(), lr=1.0)
    torch.nn.init.normal_(critic.head.weight, std=1.0)
    with critic.active():
        critic.values(prompt_ids, prompt_mask, completion_ids, completion_mask).pow(2).sum().backward()
    assert all(p.grad is not None for p in critic.parameters())
    optimizer.step()
    after = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert torch.equal(before, after)
    policy = {id(p) for p in grpo.model.trainable_parameters(model)}
    assert policy and not policy & {id(p) for p in critic.parameters()}
    assert all(f".{CRITIC}." not in n for n, p in model.named_parameters() if p.requires_grad)


def test_critic_state_round_trip():
    model, critic = critic_setup()
    with torch.no_grad():
        for p in critic.parameters():
            p.normal_()
    state = critic.state_dict()
    assert {"v_head.weight", "v_head.bias"} <= set(state) and any("lora_A" in k for k in state)
    _, other = critic_setup()
    other.load_state_dict(state)
    with critic.active():
        mine = critic.values(*batch())
    with other.active():
        theirs = other.values(*batch())
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="value head"):
        other.load_state_dict({k: v for k, v in state.items() if not k.startswith("v_head")})


def test_value_loss_gradients_accumulate_over_micro_batches(tmp_path):
    """The critic's gradient over 2 micro-batches equals that of 1 batch, as the policy's does."""
    grads = []
    for micro in (4, 8):
        trainer = make_trainer(tmp_path, tiny_model(seed=1), algorithm="ppo", num_generations=4, batch_size=8,
                               micro_batch_size=micro)
        with torch.no_grad():
            torch.nn.init.normal_(trainer.critic.head.weight, std=0.5)
        rollout = trainer.generate(*trainer.draw(2))  # a fresh trainer: the same seeds
        rollout.completion_mask[1, 2:] = 0  # ragged
        mask = rollout.completion_mask.float()
        old_values = trainer.critic_values(rollout)
        g = torch.Generator().manual_seed(5)
        returns = old_values + torch.randn(old_values.shape, generator=g)
        # rollout values moved by ~0.4 > cliprange_value 0.2, so the value clip is active on some tokens
        stats = trainer.accumulate_gradients(rollout, torch.zeros(8, mask.shape[1]), mask, None, None,
                                             (old_values + 0.4 * torch.randn(old_values.shape, generator=g), returns))
        assert 0 < stats["vf_clip_frac"] < 1
        grads.append([p.grad.clone() for p in trainer.critic.parameters()])
    for small, big in zip(*grads):
        torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- learning
# grpo (every loss type), rloo, gspo and reinforce_pp (beta = 0) are learned in test_trainer.py.
LEARNED_IN_TEST_TRAINER = {"grpo", "rloo", "gspo", "reinforce_pp"}
LEARNED_HERE = {
    "ppo": {},
    "ppo_kl_in_loss": {"algorithm": "ppo", "beta": 0.01, "kl_in_reward": False},
    # Dynamic sampling on (its default); overlong shaping off: every toy completion runs to the
    # 8-token limit, so the shaping (-1 at the limit) outweighs the digit reward and the policy
    # learns to stop at once (measured: reward 0.04 -> 0.0). It is tested by hand above.
    "dapo": {"overlong_penalty": 0.0},
    "dr_grpo": {},
    "reinforce_pp_kl_in_reward": {"algorithm": "reinforce_pp", "beta": 0.01},
}


def test_every_algorithm_has_a_learning_test():
    here = {overrides.get("algorithm", name) for name, overrides in LEARNED_HERE.items()}
    assert here | LEARNED_IN_TEST_TRAINER == set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(LEARNED_HERE))
def test_algorithm_learns_toy_task(tmp_path, name):
    """Same budget as the other learning tests: 12 steps, lr 2e-2, 32 completions a step."""
    overrides = {"algorithm": name, **LEARNED_HERE[name]}
    trainer = make_trainer(tmp_path, max_steps=12, **overrides)
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    rewards = [m["reward"] for m in metrics]
    assert rewards[0] < 0.3 and sum(rewards[-2:]) / 2 >= 0.9, rewards
    if overrides["algorithm"] == "ppo":
        assert all(k in metrics[-1] for k in ("vf_loss", "vf_clip_frac", "vf_grad_norm", "value_mean"))
    if overrides["algorithm"] == "dapo":
        assert all(m["groups_drawn"] >= 4 for m in metrics) and "resample_rounds" in metrics[0]
    if overrides.get("beta"):
        assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0.0


# ---------------------------------------------------------------------------- checkpoints
def test_ppo_resume_is_exact_with_the_critic(tmp_path):
    """4 steps straight == 2 steps, a fresh trainer resuming, 2 more: policy, critic, metrics."""
    common = dict(algorithm="ppo", max_steps=4, save_steps=2, beta=0.1, num_iterations=2, batch_size=16,
                  micro_batch_size=8)
    straight = make_trainer(tmp_path / "straight", **common)
    straight.train()
    first = make_trainer(tmp_path / "split", **{**common, "max_steps": 2})
    first.train()
    assert (tmp_path / "split" / "run" / "checkpoint-2" / "critic.safetensors").is_file()
    resumed = make_trainer(tmp_path / "split", **common, resume_from_checkpoint="latest")
    resumed.train()
    a, b = lora_state(straight), lora_state(resumed)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = straight.critic.state_dict(), resumed.critic.state_dict()
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    assert any(bool(v.abs().sum() > 0) for k, v in ca.items() if "lora_B" in k)  # the critic adapter trained
    drop = ("rollout_s", "update_s", "tokens_per_s")
    ma, mb = read_metrics(tmp_path / "straight" / "run"), read_metrics(tmp_path / "split" / "run")
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
           [{k: v for k, v in m.items() if k not in drop} for m in mb]


def test_resuming_a_grpo_checkpoint_with_ppo_is_a_clear_error(tmp_path):
    make_trainer(tmp_path, max_steps=1).train()
    trainer = make_trainer(tmp_path, algorithm="ppo", max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(grpo.ConfigError, match=r"checkpoint-1 was written with algorithm='grpo', but this run "
                                               r"has algorithm='ppo': resume with the same values \(--algorithm grpo\)"):
        trainer.train()


# ---------------------------------------------------------------------------- the CLI
def test_train_cli_sft_then_ppo(tmp_path, capsys):
    """`train.py --mode both --algorithm ppo` (the seeds' first recipe) on a tiny model folder."""
    import train

    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    code = train.main([
        "--model", str(model_dir), "--output_dir", str(out), "--mode", "both", "--algorithm", "ppo",
        "--dataset", "synthetic:8", "--sft_steps", "2", "--sft_batch_size", "4", "--max_steps", "2",
        "--num_generations", "1", "--batch_size", "4", "--micro_batch_size", "2", "--max_completion_length", "8",
        "--max_prompt_length", "64", "--progress_bar", "false", "--load_in_4bit", "false",
    ])
    assert code == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["kl"] == 0.0  # PPO starts at the SFT adapter, its frozen reference
    assert all(math.isfinite(m["vf_loss"]) for m in metrics)
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "critic.safetensors").is_file()


# ---------------------------------------------------------------------------- against TRL 1.16 and the papers
def test_sequence_kl_rewards_by_hand():
    # k1 = old - ref per token = [[0.5, -0.25, (pad 9)], [1.0, 0, 0]]; sums [0.25, 1.0];
    # beta 0.1 -> rewards [1 - 0.025, 0 - 0.1].
    from grpo.algorithms import sequence_kl_rewards

    old = torch.tensor([[0.5, -0.25, 9.0], [1.0, 0.0, 0.0]])
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]), old, torch.zeros(2, 3))
    torch.testing.assert_close(sequence_kl_rewards(inputs, 0.1), torch.tensor([0.975, -0.1]))
    assert torch.equal(sequence_kl_rewards(inputs, 0.0), inputs.rewards)


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo", "rloo", "gspo"])
def test_kl_in_reward_changes_the_gradient_of_outcome_algorithms(tmp_path, algorithm):
    # Before: with kl_in_reward the loss skipped the KL and the outcome advantages ignored it,
    # so beta 0.04 gave exactly the gradient of beta 0. The KL now enters each sequence's reward.
    grads = {}
    for beta in (0.0, 0.5):
        trainer = make_trainer(tmp_path / f"b{beta}", algorithm=algorithm, beta=beta, kl_in_reward=True,
                               dynamic_sampling=False, overlong_penalty=0.0, max_steps=1, learning_rate=1e-3,
                               lora_dropout=0.0)
        with torch.no_grad():  # a policy away from the reference, so that the KL is not 0
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
        rows, seeds = trainer.draw(trainer.config.prompts_per_step)
        rollout = trainer.generate(rows, seeds)
        rewards, _ = trainer.score(rows, rollout)
        old, ref = trainer.frozen_logprobs(rollout)
        adv, _ = trainer.advantages(AdvantageInputs(rewards, rollout.completion_mask, old, ref))
        trainer.accumulate_gradients(rollout, adv, rollout.completion_mask.float(), old, ref)
        grads[beta] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        if beta > 0:  # the loss holds no KL term: the advantages carry it
            kl = ((old - ref) * rollout.completion_mask).sum(-1)
            expected, _ = ALGORITHMS[algorithm].advantage(
                AdvantageInputs(rewards - beta * kl, rollout.completion_mask), trainer.config)
            torch.testing.assert_close(adv, expected)
    assert not torch.allclose(grads[0.0], grads[0.5], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_masked_rows_still_count_as_outputs_in_the_normalizer(tmp_path, loss_type):
    # Rows 1 and 2 of 4 are masked (truncated). ratio = 1 at the first update, so each kept
    # token's loss is -A_i, with A = [1, -2, 3, -0.5], lengths [2, 3, 1, 4], T_max 8, B 4:
    #   grpo:    (-1 + 0.5) / 4 = -0.125               (each kept row's token mean, over all B rows)
    #   dr_grpo: (-1 * 2 + 0.5 * 4) / (4 * 8) = 0       -> use A_4 = -1.5: (-2 + 6) / 32 = 0.125
    #   bnpo:    (-2 + 6) / 6 kept tokens = 0.6667
    trainer = make_trainer(tmp_path, max_steps=1, sampler_correction="none", num_generations=2, batch_size=4,
                           micro_batch_size=2, loss_type=loss_type)
    rows, seeds = trainer.draw(2)
    rollout = trainer.generate(rows, seeds)
    lengths = torch.tensor([2, 3, 1, 4])
    rollout.completion_mask = (torch.arange(8)[None] < lengths[:, None]).long()
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = torch.tensor([1.0, -2.0, 3.0, -1.5])
    stats = trainer.accumulate_gradients(rollout, adv, rollout.completion_mask.float() * keep[:, None], None, None)
    expected = {"grpo": (-1 + 1.5) / 4, "dr_grpo": (-2 + 6) / 32, "bnpo": (-2 + 6) / 6}[loss_type]
    assert stats["loss"] == pytest.approx(expected, abs=1e-6)


def test_rloo_sums_each_sequences_log_probs():
    # RLOO (Ahmadian et al. 2024) weighs the sequence's summed log-prob: grad = -1/B sum_i A_i
    # sum_t grad logp_it. Our default aggregation (dr_grpo) gives that divided by T_max.
    from grpo.losses import objective

    cfg = GRPOConfig(algorithm="rloo")
    assert cfg.loss_type == "dr_grpo"
    logp = (-torch.rand(3, 5, generator=torch.Generator().manual_seed(0))).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([0.5, -1.0, 0.5])
    loss, _ = objective(logp, logp.detach(), adv, mask, policy_loss=ALGORITHMS["rloo"].policy_loss,
                        aggregation=cfg.loss_type, norms=dict(num_sequences=3, num_tokens=9, max_completion_length=5),
                        eps_low=0.2, eps_high=0.2)
    got, = torch.autograd.grad(loss, logp)
    reinforce = -(adv * (logp * mask).sum(-1)).sum() / 3
    want, = torch.autograd.grad(reinforce, logp)
    torch.testing.assert_close(got, want / 5)
