"""Run the CLIs as a user does: `run_main` in process, or train.py in a subprocess (signals,
kill -9 and torchrun need a real process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_run_args(model_dir, out_dir, **overrides) -> list[str]:
    """train.py flags for a few fast GRPO steps of the tiny model on synthetic problems."""
    args = {"model": model_dir, "output_dir": out_dir, "mode": "grpo", "dataset": "synthetic:32",
            "max_steps": 2, "num_generations": 4, "batch_size": 8, "micro_batch_size": 4,
            "max_completion_length": 8, "max_prompt_length": 96, "progress_bar": "false",
            "load_in_4bit": "false", "lora_dropout": 0.0, "learning_rate": 1e-3, "beta": 0.1,
            "save_steps": 1, "save_total_limit": 10, "log_completions_steps": 0, "fast_rollout": "false"}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def run_train(args: list[str], *, torchrun: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS`, or `torchrun --nproc_per_node N train.py ARGS`."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.run(launcher + [str(REPO / "train.py"), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start_train(args: list[str], prelude: str = "") -> subprocess.Popen:
    """train.main(ARGS) in a subprocess after running `prelude` (e.g. a patch that pauses a
    save, to kill the process at a known point); stdout is line-buffered for waiting on it."""
    code = f"import sys, train\n{prelude}\nsys.exit(train.main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-u", "-c", code, *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a CLI's main(argv) run in process, SystemExit included."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err
