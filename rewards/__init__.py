"""Reward functions with the TRL-compatible signature `fn(prompts, completions, **columns)`,
a registry of them by name, and the weighted sum over a batch (`compute_rewards`).

`python -m rewards` runs every registered reward's worked example (from its docstring).
"""

from rewards.compute import NonFiniteRewardError, RewardError, compute_rewards
from rewards.functions import (
    completion_text,
    consistency_reward,
    correctness_reward,
    hash_format_reward,
    int_reward,
    length_reward,
    make_length_reward,
    make_repetition_reward,
    reasoning_reward,
    repetition_reward,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)
from rewards.registry import REGISTRY, RewardLoadError, get_reward

__all__ = [
    "REGISTRY",
    "NonFiniteRewardError",
    "RewardError",
    "RewardLoadError",
    "compute_rewards",
    "get_reward",
    "completion_text",
    "consistency_reward",
    "correctness_reward",
    "hash_format_reward",
    "int_reward",
    "length_reward",
    "make_length_reward",
    "make_repetition_reward",
    "reasoning_reward",
    "repetition_reward",
    "soft_format_reward",
    "strict_format_reward",
    "xmlcount_reward",
]
