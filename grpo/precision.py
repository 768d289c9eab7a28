"""Which floating-point precision each part of a run computes in, and why.

On CUDA the sampler copy and a 4-bit base compute in bfloat16 where the GPU supports it.
On CPU it depends on the CPU: with AVX512-BF16 (or AMX) oneDNN runs bfloat16 matmuls at
a multiple of the float32 rate (benchmarks/RESULTS.md, the cpu_dtype tables); without them
bfloat16 is emulated and slower than float32. `cpu_dtype: auto` asks torch which
instructions the CPU has and whether this build has oneDNN, whose kernels use them
(`detect_cpu_bf16`).

With bfloat16 chosen on CPU:
- the sampling copy (`grpo.fastgen.FastPolicy`) holds bfloat16 weights (half the memory);
  the sampler / learner mismatch this adds is measured and corrected by truncated
  importance sampling (`sampler_correction`);
- the learner's decoder forward (and backward) runs under `torch.autocast("cpu",
  torch.bfloat16)`: LoRA and critic weights, optimizer state, the output layer's log-prob
  kernel (bf16 hidden states, float32 matmul and log-softmax) and the loss stay float32;
- evaluation samples under the same autocast.
"""

from __future__ import annotations

import contextlib
import functools

import torch

CPU_DTYPES = ("auto", "float32", "bfloat16")


def cpu_bf16_instructions() -> str | None:
    """The CPU feature that gives native bfloat16 matmuls, as torch reports it, or None."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


@functools.cache
def detect_cpu_bf16() -> tuple[bool, str]:
    """(whether bfloat16 matmuls are fast on this CPU, the reason in words): the instructions
    torch reports, and oneDNN (torch's bf16 CPU kernels) in this build. No timed matmul
    decides it: on a loaded machine one flipped (a 512 x 512 bf16 matmul measured 0.2x the
    float32 rate while the other core was busy, 2.0x idle), and a run's precision must not
    depend on what else the machine is doing."""
    isa = cpu_bf16_instructions()
    if isa is None:
        return False, "this CPU has no AVX512-BF16 or AMX, so bfloat16 would be emulated (slower than float32)"
    if not torch.backends.mkldnn.is_available():
        return False, f"this CPU has {isa}, but this torch build has no oneDNN, whose kernels use it"
    return True, f"this CPU has {isa}, which oneDNN uses for bfloat16 matmuls"


def resolve_cpu_dtype(setting: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(the CPU compute dtype, why), or (None, "") off CPU with `cpu_dtype: auto`; another
    setting off CPU cannot take effect and is refused (ConfigError)."""
    from grpo.config import ConfigError

    if setting not in CPU_DTYPES:
        raise ConfigError(f"cpu_dtype={setting!r}: choose one of {', '.join(CPU_DTYPES)}.")
    if torch.device(device).type != "cpu":
        if setting != "auto":
            raise ConfigError(f"cpu_dtype={setting!r} applies on CPU only; this run is on {device} (bfloat16 "
                              "where the GPU supports it): leave cpu_dtype at auto.")
        return None, ""
    if setting == "float32":
        return torch.float32, "cpu_dtype is float32"
    if setting == "bfloat16":
        fast, why = detect_cpu_bf16()
        return torch.bfloat16, "cpu_dtype is bfloat16" + ("" if fast else f" (slow here: {why})")
    fast, why = detect_cpu_bf16()
    return (torch.bfloat16 if fast else torch.float32), why


def autocast(dtype: torch.dtype | None):
    """bfloat16 autocast on CPU when `dtype` is bfloat16, else a no-op context."""
    if dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(dtype: torch.dtype | None, why: str) -> str:
    """One log line: what computes in which precision on CPU, and why."""
    if dtype is None:
        return ""
    if dtype == torch.bfloat16:
        return (f"precision: bfloat16 on CPU ({why}): sampling copy in bfloat16, the learner's decoder under "
                "bfloat16 autocast, evaluation under bfloat16 autocast; LoRA weights, optimizer, log-probs and "
                "loss in float32. cpu_dtype: float32 turns it off.")
    return f"precision: float32 on CPU ({why}). cpu_dtype: bfloat16 forces bfloat16."
