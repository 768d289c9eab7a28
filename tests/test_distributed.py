"""torchrun data parallelism on CPU (gloo, 2 processes) against one process.

Same global batch, same seeds, LoRA dropout 0: after 2 steps the adapter of
`torchrun --nproc_per_node 2 train.py` equals that of `python train.py` up to float
summation order, the per-step rewards are identical (each prompt is sampled from its own
seeded stream, so the ranks sample what one process samples), and a torchrun run stopped
after step 1 and resumed under torchrun ends at the same adapter.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_run import run_train, tiny_run_args

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX only")


def finish(out):
    """(adapter at checkpoint-2, metrics rows) of a run in `out`."""
    weights = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, rows


def assert_close_runs(a, b):
    (wa, ma), (wb, mb) = a, b
    assert wa.keys() == wb.keys()
    moved = 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
        moved += int(wa[k].abs().max() > 1e-4)
    assert moved > 0, "the adapter never moved: the comparison would prove nothing"
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):  # the same samples, so the same rewards; the update statistics too
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-6)
        assert x["reward_std"] == pytest.approx(y["reward_std"], abs=1e-6)
        for key in ("loss", "kl", "completion_length", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("algorithm,extra", [
    ("grpo", {"scale_rewards": "batch"}),  # the std of the WHOLE batch: gathered over ranks
    ("ppo", {"num_generations": 1, "batch_size": 4, "micro_batch_size": 2}),  # critic gradients + whitening
])
def test_torchrun_two_ranks_equals_one_process(tiny_model_dir, tmp_path, algorithm, extra):
    args = dict(algorithm=algorithm, **extra)
    single = run_train(tiny_run_args(tiny_model_dir, tmp_path / "single", **args))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_train(tiny_run_args(tiny_model_dir, tmp_path / "ddp", **args), torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_close_runs(finish(tmp_path / "single"), finish(tmp_path / "ddp"))
    rng = torch.load(tmp_path / "ddp" / "checkpoint-2" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2  # two ranks really ran (each saved its RNG state)
    if algorithm == "ppo":
        return
    # resume under torchrun: stop after step 1, continue to step 2
    out = tmp_path / "ddp_resumed"
    first = run_train(tiny_run_args(tiny_model_dir, out, max_steps=1, **args), torchrun=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(tiny_run_args(tiny_model_dir, out, resume_from_checkpoint="latest", **args), torchrun=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_close_runs(finish(tmp_path / "single"), finish(out))


def test_torchrun_rejects_prompts_that_do_not_split(tiny_model_dir, tmp_path):
    bad = run_train(tiny_run_args(tiny_model_dir, tmp_path / "odd", batch_size=12), torchrun=2)  # 3 prompts
    assert bad.returncode != 0
    assert "error: batch_size=12 is 3 prompts x num_generations=4; 3 prompts do not split over 2 ranks" in bad.stderr
