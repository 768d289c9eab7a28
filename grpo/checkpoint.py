"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoint-{step}/` holding:
  adapter_model.safetensors + adapter_config.json   the policy adapter (PEFT format)
  optimizer.pt, scheduler.pt                         state dicts (loaded with weights_only=True)
  rng.pt                                             torch CPU/CUDA RNG and the sampling generator
  trainer_state.json                                 step, data position, python RNG state
  config.yaml                                        the resolved config of the run
  NAME.safetensors                                   optional extra weights (e.g. critic.safetensors:
                                                     PPO's value adapter and head)
It is written into `checkpoint-{step}.tmp-PID/` and renamed into place only when complete
(`os.replace` of a directory is atomic on POSIX), so a crash mid-save leaves the previous
checkpoints intact and no half checkpoint that `latest` could pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message says which and why."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """`latest` -> the newest complete checkpoint of output_dir; otherwise a path."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"resume_from_checkpoint=latest but {output_dir} holds no checkpoint-N folder: "
                "start without --resume_from_checkpoint, or point it at a checkpoint path."
            )
        return found[-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(
            f"resume_from_checkpoint={spec!r} is not a checkpoint folder (no trainer_state.json there); "
            f"use `latest` or a path like {Path(output_dir) / 'checkpoint-50'}."
        )
    return path


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    generator: torch.Generator,
    trainer_state: dict[str, Any],
    config,
    keep: int,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint-{step} atomically, then delete all but the newest `keep`.
    `extra_tensors` maps a name to a state dict written as NAME.safetensors."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(generator), tmp / "rng.pt")
        state = {**trainer_state, "step": step, "python_rng": _jsonable(random.getstate())}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        config.save(tmp / "config.yaml")
        for name, tensors in (extra_tensors or {}).items():
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / f"{name}.safetensors"))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. resumed and stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler, generator: torch.Generator) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG in place; return the trainer state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    try:
        weights = load_file(str(path / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(
                f"checkpoint {path} holds adapter weights this model does not have "
                f"(e.g. {result.unexpected_keys[0]}): it comes from another model or LoRA config."
            )
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True), generator)
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} could not be loaded: {err}") from err
    random.setstate(_python_rng(state.pop("python_rng")))
    return state


def load_tensors(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict saved as `extra_tensors[name]` in checkpoint `path`."""
    from safetensors.torch import load_file

    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {file.name}: it was saved by a run without a {name} "
                              "(e.g. another algorithm); resume with the same algorithm.")
    return load_file(str(file))


def _jsonable(python_rng_state: tuple) -> list:
    version, internal, gauss = python_rng_state
    return [version, list(internal), gauss]


def _python_rng(saved: list) -> tuple:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _fsync_dir(path: Path) -> None:
    """Make the directory entry durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
