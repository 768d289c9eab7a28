"""Names of the built-in rewards, and `get_reward` to resolve a name or a user's function."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from rewards import functions as F
from rewards.compute import RewardError

__all__ = ["REGISTRY", "RewardLoadError", "get_reward"]


class RewardLoadError(RewardError, ValueError):
    """A reward name or path that does not resolve to a function. A RewardError (the CLIs
    report it as bad input) and a ValueError (what `get_reward` always raised)."""

# name -> reward function (configs and the CLI refer to rewards by these names)
REGISTRY: dict[str, Callable] = {
    "correctness": F.correctness_reward,
    "int": F.int_reward,
    "strict_format": F.strict_format_reward,
    "soft_format": F.soft_format_reward,
    "xmlcount": F.xmlcount_reward,
    "hash_format": F.hash_format_reward,
    "length": F.length_reward,
    "repetition": F.repetition_reward,
    "reasoning": F.reasoning_reward,
    "consistency": F.consistency_reward,
}


def get_reward(name: str) -> Callable:
    """A reward function by registry name ("correctness") or by the path of a user's
    function, "mypkg.rewards:my_reward" (or "mypkg.rewards.my_reward"). Only the named
    module is imported; nothing is evaluated; a bare name that is not registered is an
    error, never an import. Errors are RewardLoadErrors (ValueErrors) naming the path.

    Example: get_reward("int") is rewards.functions.int_reward.
    """
    if not isinstance(name, str) or not name.strip():
        raise RewardLoadError(f"a reward is named by a non-empty str, got {name!r}")
    name = name.strip()
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
    elif "." in name:
        module_name, _, attr_path = name.rpartition(".")
    else:
        hint = difflib.get_close_matches(name, REGISTRY, n=1)
        raise RewardLoadError(
            f"unknown reward {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f": give a registered name ({', '.join(sorted(REGISTRY))}) or the path of your own "
            "function, 'mypkg.module:function'"
        )
    if not module_name or not attr_path:
        raise RewardLoadError(f"reward path {name!r} must look like 'module.sub:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        raise RewardLoadError(
            f"reward {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "check the spelling, and that the module is installed or its folder is on PYTHONPATH"
        ) from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise RewardLoadError(
                f"reward {name!r}: {module_name!r} has no attribute {attr_path!r}; check the function's name"
            ) from exc
    if not callable(obj):
        raise RewardLoadError(
            f"reward {name!r} is a {type(obj).__name__}, not a callable: point the path at a function "
            "fn(prompts, completions, **columns) -> list[float | None]"
        )
    return obj
