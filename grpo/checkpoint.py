"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoint-{step}/` holding:
  adapter_model.safetensors + adapter_config.json   the policy adapter (PEFT format)
  optimizer.pt, scheduler.pt                         state dicts (loaded with weights_only=True)
  rng.pt                                             torch CPU/CUDA RNG state of every rank
  trainer_state.json                                 step, data position, python RNG state
  config.yaml                                        the resolved config of the run
  NAME.safetensors                                   optional extra weights (e.g. critic.safetensors:
                                                     PPO's value adapter and head)
It is written into `checkpoint-{step}.tmp-PID/` and renamed into place only when complete
(`os.replace` of a directory is atomic on POSIX), so a crash mid-save leaves the previous
checkpoints intact and no half checkpoint that `latest` could pick up; a process killed
mid-save leaves only a `*.tmp-PID` folder, which `remove_temporaries` deletes on restart.
A failed write (disk full, read-only) is a CheckpointError; the older checkpoints stay.
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


def rng_state() -> dict[str, Any]:
    """This process's torch RNG state (CPU, and CUDA when present): LoRA dropout draws from it."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete `checkpoint-N.tmp-PID` folders (saves interrupted by a kill); returns them."""
    root = Path(output_dir)
    stale = [p for p in root.glob("checkpoint-*.tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    rng_states: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    config,
    keep: int,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint-{step} atomically, then delete all but the newest `keep`.
    `rng_states`: one `rng_state()` per rank, in rank order. `extra_tensors` maps a name to
    a state dict written as NAME.safetensors. An OSError (disk full, read-only) becomes a
    CheckpointError; nothing older is touched then."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), selected_adapters=["default"], safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"ranks": rng_states}, tmp / "rng.pt")
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
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "PytorchStreamWriter" not in str(err):
            raise  # torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in list_checkpoints(output_dir)]
        raise CheckpointError(
            f"could not write {final} ({getattr(err, 'strerror', None) or str(err).splitlines()[-1]}; disk full or "
            "read-only?). "
            f"The older checkpoints are kept ({', '.join(kept) or 'none yet'}): free space or fix the "
            "permissions, then continue with --resume_from_checkpoint latest."
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_adapter(model, path: str | Path) -> Path:
    """The policy adapter alone (PEFT format, safetensors), written atomically like a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), selected_adapters=["default"], safe_serialization=True)
        _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the adapter {path} ({err.strerror or err}; disk full or "
                              "read-only?): free space or fix the permissions and run again.") from err
    return path


def load_adapter_weights(model, path: str | Path) -> None:
    """Put the adapter saved in `path` (adapter_model.safetensors) into the policy adapter."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(
            f"{path} holds adapter weights this model does not have "
            f"(e.g. {result.unexpected_keys[0]}): it comes from another model or LoRA config."
        )


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG in place; return the
    trainer state. A checkpoint from fewer ranks gives the extra ranks rank 0's RNG."""
    from safetensors import SafetensorError

    path = Path(path)
    state = _trainer_state(path)  # first: the smallest file, and the one hand edits damage
    file = path / "adapter_model.safetensors"
    try:
        load_adapter_weights(model, path)
        file = path / "optimizer.pt"
        optimizer.load_state_dict(_load_state(file))
        file = path / "scheduler.pt"
        scheduler.load_state_dict(_load_state(file))
        file = path / "rng.pt"
        ranks = _load_state(file)["ranks"]
        set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, SafetensorError) as err:
        if isinstance(err, CheckpointError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err):
            first = ("its LoRA weights have other shapes than this run's (another lora_r or "
                     "lora_target_modules): resume with the values it was trained with")
        raise CheckpointError(corrupt_message(path, file, first)) from err
    random.setstate(_python_rng(state.pop("python_rng")))
    return state


def corrupt_message(checkpoint: Path, file: Path, problem: str) -> str:
    """What to say about a checkpoint that cannot be loaded: the file, what is wrong, and the
    previous checkpoint to resume from instead, if there is one."""
    listed = list_checkpoints(checkpoint.parent)  # oldest first
    names = [p.name for p in listed]
    older = listed[: names.index(checkpoint.name)] if checkpoint.name in names else listed
    fix = (f"resume from the previous one (--resume_from_checkpoint {older[-1]})" if older
           else "no older checkpoint is left, so start the run again")
    return f"checkpoint {checkpoint} cannot be loaded: {file.name}: {problem[:300]}. It is damaged or from another run: {fix}."


def _trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, checked: a JSON object with an int `step` and the
    Python RNG state (what `save_checkpoint` writes)."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(corrupt_message(path, file, f"not readable JSON ({err})")) from err
    if not isinstance(state, dict):
        raise CheckpointError(corrupt_message(path, file, f"holds a {type(state).__name__}, not an object"))
    rng = state.get("python_rng")
    if not isinstance(state.get("step"), int) or not (isinstance(rng, list) and len(rng) == 3):
        raise CheckpointError(corrupt_message(path, file, "has no integer `step` or no `python_rng` state"))
    return state


def load_tensors(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict saved as `extra_tensors[name]` in checkpoint `path`."""
    from safetensors.torch import load_file

    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {file.name}: it was saved by a run without a {name} "
                              "(e.g. another algorithm); resume with the same algorithm.")
    return load_file(str(file))


def _load_state(file: Path) -> Any:
    """A state file loaded with weights_only=True (tensors and plain containers only: a
    pickle that would run code is refused, never executed)."""
    import pickle

    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint file {file} holds pickled objects other than tensors and plain state, so it was "
            "not loaded (unpickling them could run code): resume from another checkpoint, or delete this one."
        ) from err


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
