"""The run folder: one run at a time, and never two runs mixed in it.

- `claim(run_dir, resume, overwrite)`: a folder that already holds a run (checkpoints,
  metrics, an SFT adapter) is refused unless the run resumes it; with `overwrite` the old
  run's files are moved aside to `<run_dir>.old-<time>/` first (moved, never deleted).
- `RunLock(run_dir)`: a lock file `.lock` holding the process id and host while a run
  writes there; a second run on the folder is refused by name. A lock left by a process
  that no longer runs (kill -9) is taken over, with a message. Re-entrant within one
  process (train.py holds it around SFT and GRPO, and each trainer takes it again).
- `open_run`: both, for one block: what `Trainer.train`, `SFTTrainer.train` and train.py use.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from grpo.checkpoint import CheckpointError

LOCK = ".lock"
# What a run writes into its folder; any of them means the folder holds a run.
RUN_FILES = ("metrics.jsonl", "completions.jsonl", "config.yaml")
RUN_DIRS = ("sft", "plots")


def run_files(run_dir: str | Path, ignore: tuple[str, ...] = ()) -> list[Path]:
    """The entries of `run_dir` that belong to a run (checkpoint-N folders included), sorted."""
    path = Path(run_dir)
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if p.name not in ignore and (
        p.name in RUN_FILES or p.name in RUN_DIRS or (p.is_dir() and p.name.startswith("checkpoint-"))
        or (p.name == "adapter" and p.is_dir()))]
    return sorted(found)


def claim(run_dir: str | Path, *, resume: bool, overwrite: bool, ignore: tuple[str, ...] = ()) -> Path | None:
    """Make `run_dir` ready for a new run (or a resumed one). Returns the folder the old run
    was moved to, if any. Raises CheckpointError for a folder holding a run that is neither
    resumed nor overwritten. `ignore`: names this run wrote itself (GRPO after SFT: "sft")."""
    if resume:
        return None
    old = run_files(run_dir, ignore)
    if not old:
        return None
    names = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
    if not overwrite:
        raise CheckpointError(
            f"output_dir {run_dir} already holds a run ({names}): continue it with --resume_from_checkpoint "
            "latest, start this run in another --output_dir, or pass --overwrite_output_dir true to move the "
            "old run aside first (nothing is deleted).")
    aside = Path(f"{Path(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two overwrites within a second
        aside, n = Path(f"{aside}-{n}"), n + 1
    aside.mkdir(parents=True)
    for p in old:
        os.replace(p, aside / p.name)  # same file system: a rename, atomic per entry
    print(f"moved the old run in {run_dir} ({names}) aside to {aside}", flush=True)
    return aside


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` the folder is this process's while the block runs."""

    _held: dict[str, int] = {}  # resolved path -> depth, for re-entry in one process

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self.key = str(self.path.resolve())

    def __enter__(self) -> "RunLock":
        self.outermost = not self._held.get(self.key)
        if not self.outermost:
            self._held[self.key] += 1
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner(lock)
                same_host = owner.get("host") == me["host"]
                if isinstance(owner.get("pid"), int) and same_host and not _alive(owner["pid"]):
                    print(f"{lock}: the run that held it (pid {owner['pid']}) is no longer running; taking it over.",
                          flush=True)
                    lock.unlink(missing_ok=True)
                    continue
                raise CheckpointError(
                    f"output_dir {self.path} is in use by another run (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}, lock file {lock}): wait for it to finish, or use another "
                    "--output_dir. If no such run exists, delete the lock file.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held[self.key] = 1
            return self
        raise CheckpointError(f"{lock}: could not take the lock; delete the file if no run uses {self.path}.")

    @staticmethod
    def _owner(lock: Path) -> dict:
        try:
            owner = json.loads(lock.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        self._held[self.key] -= 1
        if self._held[self.key] == 0:
            del self._held[self.key]
            (self.path / LOCK).unlink(missing_ok=True)


@contextlib.contextmanager
def open_run(run_dir: str | Path, *, resume: bool, overwrite: bool, main: bool = True,
             ignore: tuple[str, ...] = ()) -> Iterator[None]:
    """The folder for one run, for the block: writable (probed), locked, and claimed (`claim`)
    by the outermost holder of the lock. Only the main rank locks and claims; the others
    pass through (they write nothing there)."""
    if not main:
        yield
        return
    from grpo.faults import check_writable

    check_writable(run_dir)  # before the lock file: a read-only folder gets the write probe's message
    lock = RunLock(run_dir)
    with lock:
        if lock.outermost:
            claim(run_dir, resume=resume, overwrite=overwrite, ignore=ignore)
        yield
