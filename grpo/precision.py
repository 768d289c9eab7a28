"""Which floating-point precision each part of a run computes in, and why.

On CUDA the sampler copy and a 4-bit base compute in bfloat16 where the GPU supports it.
On CPU it depends on the CPU: with AVX512-BF16 (or AMX) oneDNN runs bfloat16 matmuls at
a multiple of the float32 rate (benchmarks/RESULTS.md, bf16 on CPU); without them bfloat16
is emulated and slower than float32. `cpu_dtype: auto`
asks torch which instructions the CPU has, and confirms with a short timed matmul (a build
without oneDNN's bf16 kernels reports the instructions but gains nothing).

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
import time

import torch

CPU_DTYPES = ("auto", "float32", "bfloat16")
MIN_SPEEDUP = 1.3  # a bf16 matmul at least this much faster than float32 counts as fast


def cpu_bf16_instructions() -> str | None:
    """The CPU feature that gives native bfloat16 matmuls, as torch reports it, or None."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def matmul_speedup(n: int = 512, repeats: int = 5) -> float:
    """float32 time / bfloat16 time of an n x n matmul on this CPU (best of `repeats`, after
    one warm-up call each): ~10 ms of work for n = 512."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


@functools.cache
def detect_cpu_bf16() -> tuple[bool, str]:
    """(whether bfloat16 matmuls are fast on this CPU, the reason in words). Cached: the
    timed matmul runs once per process."""
    isa = cpu_bf16_instructions()
    if isa is None:
        return False, "this CPU has no AVX512-BF16 or AMX, so bfloat16 would be emulated (slower than float32)"
    speedup = matmul_speedup()
    if speedup < MIN_SPEEDUP:
        return False, (f"this CPU reports {isa}, but a bfloat16 matmul ran only {speedup:.1f}x the float32 "
                       f"rate here (under {MIN_SPEEDUP}x)")
    return True, f"this CPU has {isa}: a bfloat16 matmul ran {speedup:.1f}x the float32 rate here"


def resolve_cpu_dtype(setting: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(the CPU compute dtype, why), or (None, "") off CPU, where `cpu_dtype` does not apply."""
    if setting not in CPU_DTYPES:
        raise ValueError(f"cpu_dtype={setting!r}: choose one of {', '.join(CPU_DTYPES)}.")
    if torch.device(device).type != "cpu":
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
