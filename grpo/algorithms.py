"""An RL algorithm is a choice of advantage function, policy loss and critic, not a trainer.

`ALGORITHMS[cfg.algorithm]` tells the one loop in `grpo.trainer` what to plug in:

    name          advantage                                policy loss        critic  source
    grpo          group mean / std                         token ratio clip   no      Shao et al. 2024, arXiv:2402.03300
    dr_grpo       group mean, no std, constant normalizer  token ratio clip   no      Liu et al. 2025, arXiv:2503.20783
    dapo          group mean / std (+ dynamic sampling,    clip-higher        no      Yu et al. 2025, arXiv:2503.14476
                  overlong shaping: config defaults)
    rloo          leave-one-out baseline                   token ratio clip   no      Ahmadian et al. 2024, arXiv:2402.14740
    gspo          group mean / std                         sequence ratio     no      Zheng et al. 2025, arXiv:2507.18071
    reinforce_pp  batch-whitened returns of r - beta * KL  token ratio clip   no      Hu 2025, arXiv:2501.03262
    ppo           whitened GAE over r - beta * KL          token ratio clip   yes     Schulman et al. 2017 / 2016,
                                                                                      Ouyang et al. 2022
Config defaults (scaling, aggregation, clip range, kl_in_reward, dynamic sampling, overlong
shaping) live in `config.ALGORITHM_DEFAULTS` only; this module holds the structure.

With `kl_in_reward`, the outcome algorithms (grpo, dr_grpo, dapo, rloo, gspo) subtract
beta * sum_t k1_t from each completion's reward before the advantage (RLOO's sequence-level
KL reward); reinforce_pp and ppo put -beta * k1_t into the per-token rewards. Either way the
loss then has no KL term. RLOO's loss sums each sequence's token losses (its estimator weighs
the sequence's summed log-prob), divided by the constant max_completion_length: the dr_grpo
aggregation, the paper's estimator up to a fixed learning-rate scale.

Every advantage function has one signature, `fn(inputs: AdvantageInputs, cfg) ->
(adv [B] or [B, T], returns [B, T] or None)`; the policy losses accept either shape.
Pure functions of tensors and config values (no trainer, no model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from grpo.advantages import ADVANTAGES, gae, kl_penalized_token_rewards, reinforce_pp_token_advantages, whiten
from grpo.losses import kl_k1, overlong_penalty


@dataclass
class AdvantageInputs:
    """What an advantage function may read about one rollout batch of B completions."""

    rewards: Tensor  # [B] (shaped) rewards, G consecutive completions per prompt
    mask: Tensor  # [B, T] completion mask (1 = real token, right padding)
    old_logp: Optional[Tensor] = None  # [B, T] log-probs of the sampling policy (for the KL in the reward)
    ref_logp: Optional[Tensor] = None  # [B, T] reference log-probs (None when beta == 0)
    values: Optional[Tensor] = None  # [B, T] critic values V(s_t) at rollout time (PPO)


AdvantageResult = tuple[Tensor, Optional[Tensor]]


@dataclass(frozen=True)
class Algorithm:
    advantage: Callable[[AdvantageInputs, object], AdvantageResult]
    policy_loss: str  # key of grpo.losses.POLICY_LOSSES
    uses_critic: bool = False


# ---------------------------------------------------------------------- advantage functions
def reward_kl(inputs: AdvantageInputs, beta: float) -> Tensor:
    """[B, T] per-token KL of the sampling policy against the reference, for the reward.

    k1 = logp - ref_logp, the estimator PPO-RLHF puts in the reward (Ouyang et al. 2022,
    eq. 2; Stiennon et al. 2020); zeros when there is no KL penalty (beta == 0)."""
    if beta == 0 or inputs.ref_logp is None:
        return torch.zeros_like(inputs.mask, dtype=torch.float32)
    if inputs.old_logp is None:
        raise ValueError("the KL in the reward needs the sampling policy's log-probs (old_logp)")
    return kl_k1(inputs.old_logp, inputs.ref_logp)


def sequence_kl_rewards(inputs: AdvantageInputs, beta: float) -> Tensor:
    """[B] rewards r - beta * sum_t k1_t over each completion's real tokens: the KL penalty
    in the sequence-level reward, as RLOO defines it (Ahmadian et al. 2024, the reward
    r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))); the rewards unchanged when beta == 0."""
    if beta == 0:
        return inputs.rewards
    kl = reward_kl(inputs, beta) * inputs.mask  # [B, T]
    return inputs.rewards - beta * kl.sum(-1).to(inputs.rewards.dtype)


def outcome_advantage(name: str) -> Callable[[AdvantageInputs, object], AdvantageResult]:
    """The outcome-level `advantages.ADVANTAGES[name]`: one advantage per completion, [B].
    With `kl_in_reward`, the KL penalty is taken from each sequence's reward first
    (`sequence_kl_rewards`), and the loss then has no KL term."""
    fn = ADVANTAGES[name]

    def advantage(inputs: AdvantageInputs, cfg) -> AdvantageResult:
        rewards = sequence_kl_rewards(inputs, cfg.beta) if cfg.kl_in_reward else inputs.rewards
        return fn(rewards, cfg.num_generations, cfg.scale_rewards, cfg.adv_eps), None

    advantage.__name__ = f"{name}_advantage"
    return advantage


def reinforce_pp_advantage(inputs: AdvantageInputs, cfg) -> AdvantageResult:
    """REINFORCE++ (Hu 2025): with the KL in the reward, whiten(sum_{k>=t} gamma^(k-t) r_k)
    over every real token of the batch, [B, T]; without it (beta == 0 or kl_in_reward off),
    the outcome form, rewards normalized over the batch, [B]."""
    if cfg.kl_in_reward and cfg.beta > 0:
        kl = reward_kl(inputs, cfg.beta)
        return reinforce_pp_token_advantages(inputs.rewards, kl, inputs.mask, cfg.beta, cfg.gamma), None
    return outcome_advantage("reinforce_pp")(inputs, cfg)


def ppo_advantage(inputs: AdvantageInputs, cfg) -> AdvantageResult:
    """PPO: GAE (Schulman et al. 2016, eq. 16) over r_t = -beta * KL_t (+ the outcome reward
    at the last real token), the advantages whitened over the batch's real tokens (as in
    PPO2 / OpenRLHF); the value targets are the unwhitened returns A + V.

    Returns (adv [B, T], returns [B, T])."""
    if inputs.values is None:
        raise ValueError("ppo needs the critic's values at rollout time (AdvantageInputs.values)")
    beta = cfg.beta if cfg.kl_in_reward else 0.0
    token_rewards = kl_penalized_token_rewards(inputs.rewards, reward_kl(inputs, beta), inputs.mask, beta)
    adv, returns = gae(token_rewards, inputs.values, inputs.mask, cfg.gamma, cfg.lam)
    return whiten(adv, inputs.mask), returns


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(outcome_advantage("grpo"), "clip"),
    "dr_grpo": Algorithm(outcome_advantage("dr_grpo"), "clip"),
    "dapo": Algorithm(outcome_advantage("dapo"), "clip"),
    "rloo": Algorithm(outcome_advantage("rloo"), "clip"),
    "gspo": Algorithm(outcome_advantage("gspo"), "gspo"),
    "reinforce_pp": Algorithm(reinforce_pp_advantage, "clip"),
    "ppo": Algorithm(ppo_advantage, "clip", uses_critic=True),
}


# ---------------------------------------------------------------------- reward shaping and sampling
def shaped_rewards(rewards: Tensor, lengths: Tensor, cfg) -> Tensor:
    """Task rewards plus DAPO's soft overlong punishment (Sec. 3.4, eq. 13) when
    `cfg.overlong_penalty` > 0; [B] in, [B] out. The task reward is what is logged as
    `reward`; the shaped one only drives the advantages."""
    if cfg.overlong_penalty == 0:
        return rewards
    shaping = overlong_penalty(lengths, cfg.max_completion_length, cfg.overlong_buffer, cfg.overlong_penalty)
    return rewards + shaping.to(rewards.device, rewards.dtype)


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[P] bool: groups whose rewards are not all equal (DAPO dynamic sampling keeps these,
    Sec. 3.2: a group with equal rewards has zero advantage and no gradient)."""
    grouped = rewards.view(-1, group_size)  # [P, G]
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def fill_batch(kept: list[int], spare: list[int], num_groups: int) -> list[int]:
    """The groups of a dynamically sampled batch: informative groups first (in draw order),
    topped up with uninformative ones when the resampling bound was hit.

    >>> fill_batch([3, 5], [0, 1, 2], 4)
    [3, 5, 0, 1]
    """
    if len(kept) + len(spare) < num_groups:
        raise ValueError(f"only {len(kept) + len(spare)} groups drawn, {num_groups} needed")
    return (kept + spare)[:num_groups]
