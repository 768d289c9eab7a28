"""Names of the built-in rewards, and `get_reward` to resolve a name or a user's function."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rewards import functions as F

__all__ = ["REGISTRY", "get_reward"]

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
    module is imported; nothing is evaluated. Errors are ValueErrors naming the path.

    Example: get_reward("int") is rewards.functions.int_reward.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a reward is named by a non-empty str, got {name!r}")
    name = name.strip()
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
    elif "." in name:
        module_name, _, attr_path = name.rpartition(".")
    else:
        raise ValueError(
            f"unknown reward {name!r}: not a registered name ({', '.join(sorted(REGISTRY))}) "
            "nor a path 'module:function'"
        )
    if not module_name or not attr_path:
        raise ValueError(f"reward path {name!r} must look like 'module.sub:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ValueError(f"reward {name!r}: {module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(obj):
        raise ValueError(f"reward {name!r} is a {type(obj).__name__}, not a callable")
    return obj
