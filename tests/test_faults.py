"""Faults: kill -9 at any moment, SIGTERM / SIGINT, NaN/inf, unwritable or full disks, OOM.

The process-level tests run train.py in a subprocess on a tiny model folder and compare
the resumed run with an uninterrupted one: exact resume means the same adapter bits.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo
from grpo import faults
from grpo.checkpoint import CheckpointError, list_checkpoints
from grpo.testing import tiny_model, tiny_tokenizer
from tests.cli_run import run_train, start_train, tiny_run_args

STEPS = 5


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run of STEPS steps: (final adapter, metrics)."""
    out = tmp_path_factory.mktemp("straight")
    done = run_train(tiny_run_args(tiny_model_dir, out, max_steps=STEPS))
    assert done.returncode == 0, done.stderr[-2000:]
    return adapter(out / f"checkpoint-{STEPS}"), metrics(out)


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "adapter_model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(proc, predicate, timeout: float = 240) -> str:
    """Read the process's output until a line satisfies predicate(line) (or it exits)."""
    end = time.time() + timeout
    seen = []
    while time.time() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if predicate(line):
            return line
    proc.kill()
    raise AssertionError("the expected point never came; output:\n" + "".join(seen)[-3000:])


def assert_same_run(out: Path, straight) -> None:
    final, straight_metrics = straight
    resumed = adapter(out / f"checkpoint-{STEPS}")
    assert resumed.keys() == final.keys()
    for k in final:
        assert torch.equal(resumed[k], final[k]), k
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # each step logged once
    assert [m["reward"] for m in got] == [m["reward"] for m in straight_metrics]


# Patch run in the child: the save of checkpoint-3 stops half-written (adapter already in the
# temporary folder, nothing renamed) and says so, so the test can kill -9 it right there.
PAUSE_IN_SAVE_3 = """
import time, grpo.checkpoint as c
_orig = c._fsync_dir
def _slow(path):
    if ".tmp-" in str(path) and "checkpoint-3" in str(path):
        print("PAUSED IN SAVE", flush=True)
        time.sleep(600)
    _orig(path)
c._fsync_dir = _slow
"""


def test_kill_9_at_several_points_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, straight):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, out, max_steps=STEPS)
    # 1) killed in the middle of writing checkpoint-3
    proc = start_train(args, PAUSE_IN_SAVE_3)
    wait_for(proc, lambda line: "PAUSED IN SAVE" in line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert list(out.glob("checkpoint-3.tmp-*")), "the half-written save should be a temporary folder"
    # 2) resumed from checkpoint-2, killed right after checkpoint-4 appears (inside step 5)
    proc = start_train(args + ["--resume_from_checkpoint", "latest"])
    end = time.time() + 240
    while not (out / "checkpoint-4").is_dir() and proc.poll() is None and time.time() < end:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("checkpoint-3.tmp-*")), "leftovers of a killed save are removed on restart"
    newest = list_checkpoints(out)[-1]
    assert newest.name in ("checkpoint-4", f"checkpoint-{STEPS}")
    assert (newest / "trainer_state.json").is_file() and (newest / "adapter_model.safetensors").is_file()
    # 3) resumed to the end
    done = run_train(args + ["--resume_from_checkpoint", "latest"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(out, straight)


def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_resumes_exactly(tiny_model_dir, tmp_path, straight):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, out, max_steps=STEPS, save_steps=0)  # only the signal saves
    proc = start_train(args, "import grpo.trainer as t\n_s = t.Trainer.step\n"
                             "def step(self):\n    m = _s(self)\n    print('STEP', self.state.step, flush=True)\n"
                             "    return m\nt.Trainer.step = step")
    wait_for(proc, lambda line: line.startswith("STEP 2"))
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "SIGTERM received" in output and "--resume_from_checkpoint latest" in output
    stopped = list_checkpoints(out)
    assert len(stopped) == 1 and 2 <= int(stopped[0].name.split("-")[1]) < STEPS  # the step it was in
    done = run_train(args + ["--resume_from_checkpoint", "latest"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(out, straight)


def test_graceful_stop_first_signal_sets_the_flag_second_sigint_abandons():
    with faults.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert faults.exit_code("SIGINT") == 130 and faults.exit_code("SIGTERM") == 143


# ---------------------------------------------------------------------------- NaN / inf
PROMPTS = [{"prompt": f"q{i}", "answer": str(i)} for i in range(8)]


def make_trainer(tmp_path, reward, **overrides) -> grpo.Trainer:
    cfg = grpo.GRPOConfig(**{**dict(output_dir=str(tmp_path / "run"), num_generations=4, batch_size=8,
                                    micro_batch_size=8, max_completion_length=6, max_steps=4, save_steps=1, save_total_limit=10,
                                    progress_bar=False, log_completions_steps=0, learning_rate=1e-2,
                                    fast_rollout=False), **overrides})
    return grpo.Trainer(tiny_model(), tiny_tokenizer(), [reward], PROMPTS, cfg)


def lengths_reward(prompts, completions, **_):
    return [len(c) / 10 for c in completions]


def test_nan_rewards_skip_the_step_and_count_it(tmp_path):
    calls = {"n": 0}

    def sometimes_nan(prompts, completions, **_):
        calls["n"] += 1
        return [math.nan if calls["n"] == 2 else len(c) / 10 for c in completions]

    trainer = make_trainer(tmp_path, sometimes_nan)
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1].get("skipped") == 1.0 and "skipped" not in rows[0] and "skipped" not in rows[2]
    assert rows[3]["skipped_steps"] == 1 and trainer.state.nonfinite_in_row == 0
    # the skipped step applied no update: checkpoint-2 holds checkpoint-1's weights
    one, two = (adapter(tmp_path / "run" / f"checkpoint-{i}") for i in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_nan_every_step_stops_with_where_it_came_from_and_saves_no_nan(tmp_path):
    def always_inf(prompts, completions, **_):
        return [math.inf] * len(completions)

    trainer = make_trainer(tmp_path, always_inf, max_steps=10)
    with pytest.raises(faults.TrainingError, match=r"3 steps in a row .* rewards: reward function 'always_inf' "
                                                   r"returned inf for sample 0"):
        trainer.train()
    assert trainer.state.step == 3
    for ckpt in list_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(t).all() for t in adapter(ckpt).values())


def test_nan_log_probs_and_gradients_are_caught_before_the_update(tmp_path):
    trainer = make_trainer(tmp_path, lengths_reward, max_steps=1)
    start = {n: p.detach().clone() for n, p in trainer.named_trainable}
    original = trainer.logprobs

    def nan_logprobs(rollout, mb, return_entropy=False):
        out = original(rollout, mb, return_entropy)
        logp = out[0] if return_entropy else out
        poisoned = logp + torch.where(torch.arange(logp.shape[1]) == 1, math.nan, 0.0)  # NaN at token 1
        return (poisoned, out[1]) if return_entropy else poisoned

    trainer.logprobs = nan_logprobs
    m = trainer.step()
    assert m["skipped"] == 1.0
    assert all(torch.equal(p, start[n]) for n, p in trainer.named_trainable)  # no update
    assert trainer.state.skipped_steps == 1
    # a NaN gradient alone (finite loss) is named by its parameter
    name, p = trainer.named_trainable[0]
    p.grad = torch.full_like(p, math.nan)
    assert faults.nonfinite_grad(trainer.named_trainable) == f"gradients: nan/inf in {name}"


def test_save_refuses_nan_weights_and_keeps_older_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, lengths_reward, max_steps=1)
    trainer.train()
    with torch.no_grad():
        trainer.named_trainable[0][1].fill_(math.nan)
    trainer.state.step = 2
    with pytest.raises(faults.TrainingError, match="refusing to save .*checkpoint-2.*NaN"):
        trainer.save()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def test_first_nonfinite_describes_the_first_bad_tensor_within_the_mask():
    mask = torch.tensor([[1, 1, 0]])
    assert faults.first_nonfinite({"a": torch.tensor([[1.0, 2.0, math.nan]])}, mask) is None  # masked out
    assert faults.first_nonfinite({"a": torch.tensor([[1.0, math.inf, 0.0]]), "b": math.nan}, mask) == \
        "a: 0 nan, 1 inf of 2 values"
    assert faults.first_nonfinite({"a": None, "b": math.nan}) == "b: 1 nan, 0 inf of 1 values"


# ---------------------------------------------------------------------------- disks
def test_unwritable_output_dir_fails_before_any_work(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(faults, "open", read_only, raising=False)  # root ignores chmod: simulate EROFS
    trainer = make_trainer(tmp_path, lengths_reward)
    with pytest.raises(CheckpointError, match=r"output_dir .*run is not writable \(Read-only file system\).*"
                                              r"Choose another --output_dir"):
        trainer.train()
    assert trainer.state.step == 0


def test_output_dir_under_a_file_is_reported_through_the_cli(tmp_path, tiny_model_dir, capsys):
    import train

    (tmp_path / "afile").write_text("x")
    code = train.main(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "afile" / "run"),
                       "--mode", "grpo", "--dataset", "synthetic:8", "--max_steps", "1", "--load_in_4bit", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and "afile" in err and "Traceback" not in err


def test_disk_full_at_save_time_keeps_older_checkpoints(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, lengths_reward, max_steps=3)
    real_save = torch.save

    def full_at_step_2(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_step_2)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint-2 \(No space left on device.*"
                                              r"older checkpoints are kept \(checkpoint-1\)"):
        trainer.train()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"] and not list(run.glob("*.tmp-*"))
    monkeypatch.setattr(torch, "save", real_save)
    resumed = make_trainer(tmp_path, lengths_reward, max_steps=3, resume_from_checkpoint="latest")
    resumed.train()  # checkpoint-1 is intact and loads
    assert resumed.state.step == 3


# ---------------------------------------------------------------------------- memory
def test_rollout_out_of_memory_names_the_knobs(tmp_path, monkeypatch):
    import grpo.trainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(grpo.trainer, "generate_rollout", oom)
    trainer = make_trainer(tmp_path, lengths_reward)
    with pytest.raises(faults.TrainingError) as err:
        trainer.train()
    message = str(err.value)
    for knob in ("`generation_batch_size`", "`max_completion_length` (now 6)", "`num_generations` (now 4)",
                 "Tried to allocate 2.00 GiB"):
        assert knob in message


def test_resume_hint_repeats_the_flags_with_resume_latest():
    import train

    assert train.resume_hint([]) == "python train.py --config configs/demo.yaml --resume_from_checkpoint latest"
    assert train.resume_hint(["--config", "x.yaml", "--resume_from_checkpoint", "runs/x/checkpoint-2", "--seed", "1"]) \
        == "python train.py --config x.yaml --seed 1 --resume_from_checkpoint latest"


def test_a_resumed_run_says_what_it_resumed_and_when_nothing_is_left(tiny_run, tiny_train_argv, tmp_path, capsys):
    import shutil

    import train
    from tests.cli_run import run_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = tiny_train_argv + ["--output_dir", str(run), "--mode", "grpo", "--resume_from_checkpoint", "latest"]
    code, printed = run_main(train.main, args + ["--max_steps", "2"], capsys)
    assert code == 0
    assert f"resumed from {run / 'checkpoint-1'} at step 1: 1 of max_steps=2 left to run." in printed
    code, printed = run_main(train.main, args + ["--max_steps", "2"], capsys)  # now at step 2: nothing left
    assert code == 0 and "nothing left to run (max_steps=2); raise --max_steps to train on." in printed
    assert "GRPO: nothing left to run" in printed and "nan" not in printed


def test_a_damaged_metrics_line_is_skipped_and_reported_and_the_rest_kept(tmp_path):
    # Before: read_jsonl stopped at the first bad line, and the resume's rewrite dropped every
    # valid line after it (steps 3 and 4 here).
    from grpo.metrics import read_jsonl, truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 1, "reward": 0.1}), json.dumps({"step": 2, "reward": 0.2}),
             '{"step": 3, "rew',  # cut by a crash
             json.dumps({"step": 3, "reward": 0.3}), "[1, 2]", json.dumps({"step": 4, "reward": 0.4}),
             json.dumps({"step": 5, "reward": 0.5})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped line\(s\) 3, 5, which are not JSON records"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    with pytest.warns(UserWarning, match="skipped line"):
        truncate_jsonl(path, 4)  # resuming from checkpoint-4: step 5 goes, the bad lines go, the rest stays
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------- one run per folder
def test_a_rerun_into_a_folder_holding_a_run_is_refused_or_moves_the_old_run_aside(tiny_run, tiny_train_argv,
                                                                                   tmp_path, capsys):
    # Before: a rerun (another seed) truncated the old metrics.jsonl, kept the old checkpoints,
    # skipped its own end save, and with --mode both reused the old sft/adapter.
    import shutil

    import train
    from tests.cli_run import run_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.read_bytes() for p in run.glob("*.jsonl")}
    args = tiny_train_argv + ["--output_dir", str(run), "--mode", "both", "--seed", "7"]
    code, printed = run_main(train.main, args, capsys)
    assert code == 2 and f"output_dir {run} already holds a run" in printed
    assert "--resume_from_checkpoint latest" in printed and "--overwrite_output_dir true" in printed
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl")} == before  # nothing touched
    code, printed = run_main(train.main, args + ["--overwrite_output_dir", "true"], capsys)
    assert code == 0, printed
    [aside] = list(tmp_path.glob("run.old-*"))
    assert f"aside to {aside}" in printed
    assert {p.name: p.read_bytes() for p in aside.glob("*.jsonl")} == before  # the old run, whole
    assert (aside / "sft" / "adapter").is_dir() and (aside / "checkpoint-1").is_dir()
    assert (run / "checkpoint-1").is_dir() and (run / "sft" / "adapter").is_dir()  # the new run, whole
    assert not (run / ".lock").exists()  # released at the end


def test_the_library_trainer_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    from grpo.checkpoint import CheckpointError
    from tests.test_trainer import make_trainer

    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="already holds a run \\(checkpoint-3\\)"):
        make_trainer(tmp_path, max_steps=1).train()


def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from grpo.checkpoint import CheckpointError
    from grpo.rundir import LOCK, RunLock

    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(CheckpointError, match=f"is in use by another run \\(pid {other.pid}"):
            with RunLock(run):
                pass
    finally:
        other.kill()
        other.wait()
    with RunLock(run):  # the holder is gone (as after kill -9): taken over, with a message
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        with RunLock(run):  # re-entrant in one process
            pass
        assert (run / LOCK).exists()
    assert f"the run that held it (pid {other.pid}) is no longer running; taking it over" in capsys.readouterr().out
    assert not (run / LOCK).exists()


def test_a_full_disk_inside_torch_save_is_a_checkpoint_error(tmp_path, monkeypatch):
    # torch.save reports ENOSPC as a RuntimeError of its zip writer, not an OSError.
    trainer = make_trainer(tmp_path, lengths_reward, max_steps=2)
    real_save = torch.save

    def full_at_step_2(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_step_2)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint-2 \(PytorchStreamWriter failed writing "
                                              r"file data/0: file write failed; disk full or read-only\?\).*"
                                              r"older checkpoints are kept \(checkpoint-1\)"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {  # checkpoint file -> (how it is damaged, words the error line must hold)
    "truncated-adapter": (lambda c: _truncate(c / "adapter_model.safetensors"), ["adapter_model.safetensors"]),
    "state-empty-object": (lambda c: (c / "trainer_state.json").write_text("{}"),
                           ["trainer_state.json", "no integer `step`"]),
    "state-a-list": (lambda c: (c / "trainer_state.json").write_text("[1, 2]"), ["trainer_state.json", "a list"]),
    "state-wrong-types": (lambda c: (c / "trainer_state.json").write_text('{"step": "two", "python_rng": 3}'),
                          ["trainer_state.json", "no integer `step`"]),
    "state-not-json": (lambda c: (c / "trainer_state.json").write_text("{step: 2"), ["trainer_state.json", "not readable JSON"]),
    "truncated-optimizer": (lambda c: _truncate(c / "optimizer.pt"), ["optimizer.pt"]),
    "other-lora-rank-without-config": (lambda c: (c / "config.yaml").unlink(),
                                       ["adapter_model.safetensors", "other shapes", "lora_r"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_names_the_file_the_problem_and_the_previous_checkpoint(
        damage, tiny_run, tiny_train_argv, tmp_path, capsys):
    import shutil

    import train
    from tests.cli_run import run_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-2")  # the newest: damaged below
    hurt, words = DAMAGE[damage]
    hurt(run / "checkpoint-2")
    args = tiny_train_argv + ["--output_dir", str(run), "--mode", "grpo", "--max_steps", "3",
                              "--resume_from_checkpoint", "latest"]
    if damage == "other-lora-rank-without-config":
        args += ["--lora_r", "4"]  # the checkpoint's rank is 2; without its config.yaml only the shapes tell
    code, printed = run_main(train.main, args, capsys)
    assert code == 2 and "Traceback" not in printed, printed
    line = printed.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {run / 'checkpoint-2'} cannot be loaded"), line
    assert all(w in line for w in words), line
    assert f"resume from the previous one (--resume_from_checkpoint {run / 'checkpoint-1'})" in line
