"""Data parallelism under `torchrun`: the few collectives the trainers need.

    torchrun --nproc_per_node 4 train.py --config X.yaml

Each rank takes its contiguous share of the step's prompts (whole groups, so group
statistics never straddle ranks), generates and scores it, then:
- the advantage function sees the WHOLE batch (`gather_rows`: rewards, masks and per-token
  tensors of every rank), so batch-level statistics (`scale_rewards="batch"`, REINFORCE++
  and PPO whitening) are those of one process with the global batch;
- loss normalizers (sequences, tokens) are summed over ranks, each rank backpropagates
  its micro-batches' loss / global normalizer, and the LoRA gradients are SUMMED
  (`all_reduce_grads_`): the update is the single-process update on the global batch;
- rank 0 writes checkpoints, metrics and logs; metrics are reduced over ranks.
Sampling is seeded per prompt (`grpo.rollout.PromptStreams`), so a rank samples exactly what
one process would have sampled for the same prompts. Backend: NCCL on GPUs, gloo on CPU.

Single process (no torchrun): every function here is the identity, at no cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str = "prompts_per_step") -> slice:
        """This rank's contiguous slice of n items (n must divide evenly)."""
        if n % self.world_size:
            raise ValueError(f"{what}={n} does not split over {self.world_size} ranks: "
                             f"make it a multiple of the number of processes (torchrun --nproc_per_node).")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)


def setup() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), once per process.

    On CUDA each rank uses GPU LOCAL_RANK (set as the current device before any model is
    loaded) and NCCL; without CUDA, gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        # Rank 0 alone evaluates (eval_steps) and writes checkpoints while the others wait in
        # the next collective: a generous timeout, so a long evaluation is not taken for a hang.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    return DistInfo(rank, world, local)


def check_config(cfg, d: DistInfo) -> None:
    """ConfigError for settings that cannot run on d.world_size ranks."""
    if not d.enabled:
        return
    from grpo.config import ConfigError

    if cfg.prompts_per_step % d.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is {cfg.prompts_per_step} prompts x num_generations="
                          f"{cfg.num_generations}; {cfg.prompts_per_step} prompts do not split over "
                          f"{d.world_size} ranks: make the prompts per step a multiple of the number of processes.")
    if cfg.sft_batch_size % d.world_size:
        raise ConfigError(f"sft_batch_size={cfg.sft_batch_size} does not split over {d.world_size} ranks: "
                          "make it a multiple of the number of processes.")
    if cfg.dynamic_sampling:
        raise ConfigError("dynamic_sampling is not supported under torchrun yet (each rank would redraw its own "
                          "prompts): set --dynamic_sampling false, or run on one process.")


def info() -> DistInfo:
    """The current process's place in the group (single process when not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device() -> torch.device:
    """Where collective buffers live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_grads_(params: list[Tensor]) -> None:
    """Sum the gradients of `params` over ranks, in place, in one flat buffer (a parameter
    without a gradient on this rank counts as zeros, so every rank sends the same layout)."""
    if not info().enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def sum_scalars(values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a list of numbers."""
    if not info().enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. stop, skip this step)."""
    if not info().enabled:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(x: Tensor | None) -> Tensor | None:
    """Concatenate a tensor's rows over ranks in rank order: [b, ...] -> [world * b, ...].
    Dim 1 (the completion length T) may differ between ranks; it is right-padded with
    zeros to the longest (zero = masked out for masks and per-token tensors)."""
    d = info()
    if x is None or not d.enabled:
        return x
    if x.dim() > 1:
        width = int(max_over_ranks(x.shape[1]))
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def max_over_ranks(value: float) -> float:
    """The maximum of `value` over ranks."""
    if not info().enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def reduce_metrics(metrics: dict[str, float], sums: set[str] = frozenset()) -> dict[str, float]:
    """Metrics of the global batch from each rank's: keys in `sums` are added, `*_max`
    take the maximum, `*_min` the minimum, the rest the mean (equal shares per rank)."""
    d = info()
    if not d.enabled:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    out = {}
    for op, pick in ((dist.ReduceOp.SUM, lambda k: not k.endswith(("_max", "_min"))),
                     (dist.ReduceOp.MAX, lambda k: k.endswith("_max")),
                     (dist.ReduceOp.MIN, lambda k: k.endswith("_min"))):
        t = values.clone()
        dist.all_reduce(t, op=op)
        for i, k in enumerate(keys):
            if pick(k):
                out[k] = t[i].item() if (k in sums or op != dist.ReduceOp.SUM) else t[i].item() / d.world_size
    return out


def broadcast_params_(params: list[Tensor]) -> None:
    """Rank 0's values for `params` on every rank (the same start, whatever each rank's init)."""
    if not info().enabled:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def shutdown() -> None:
    """Leave the process group (end of a torchrun run); a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank ([obj] in a single process)."""
    d = info()
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out
