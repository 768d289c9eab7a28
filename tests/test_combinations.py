"""Every configuration either works or is refused by name.

All pairs of values of the settings below (a covering array built greedily with a fixed
seed) run one GRPO step on a tiny model: each combination either constructs and steps with
a finite loss (and, with beta > 0, a gradient that differs from the same step with beta 0:
the KL term takes effect), or fails at construction with one ConfigError naming the
conflicting fields. `refused` says which pairs cannot work; every such pair is tried too.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import grpo
from grpo.testing import tiny_model, tiny_tokenizer

FACTORS: dict[str, list] = {
    "algorithm": ["grpo", "dr_grpo", "dapo", "rloo", "gspo", "reinforce_pp", "ppo"],
    "loss_type": ["grpo", "bnpo", "dapo", "dr_grpo"],
    "scale_rewards": ["group", "batch", "none"],
    "beta": [0.0, 0.2],
    "kl_in_reward": [False, True],
    "num_iterations": [1, 2],
    "mask_truncated_completions": [False, True],
    "drop_zero_std_groups": [False, True],
    "dynamic_sampling": [False, True],
    "fast_rollout": [False, True],
    "gradient_checkpointing": [False, True],
    "load_in_4bit": [False, True],
    "sampler_correction": ["tis", "none"],
    "use_bias_correction_kl": [False, True],
    "cpu_dtype": ["float32", "bfloat16"],
}
SCALES = {"rloo": ("none",), "reinforce_pp": ("batch", "none"), "ppo": ("batch",)}


def refused(row: dict) -> str | None:
    """Why a (partial) combination cannot work, or None. The specification the config must meet."""
    algo, scale = row.get("algorithm"), row.get("scale_rewards")
    if algo in SCALES and scale is not None and scale not in SCALES[algo]:
        return "scale"
    if row.get("use_bias_correction_kl") and (row.get("beta") == 0.0 or row.get("kl_in_reward") is True):
        return "bias_kl"
    return None


def pairwise_rows(seed: int = 0, candidates: int = 60) -> list[dict]:
    """Rows that run, together covering every pair of values that can run together."""
    names = list(FACTORS)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in FACTORS[a] for vb in FACTORS[b] if refused({a: va, b: vb}) is None}
    rng, rows = random.Random(seed), []
    while uncovered:
        (a, va), (b, vb) = min(uncovered)  # every row covers at least this pair
        best, best_gain = None, -1
        for _ in range(candidates):
            row = {n: rng.choice(FACTORS[n]) for n in names} | {a: va, b: vb}
            if refused(row) is not None:
                continue
            gain = sum(((x, row[x]), (y, row[y])) in uncovered for x, y in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = row, gain
        if best is None:  # the random fill kept hitting a refusal: fix the other fields to defaults
            best = {n: FACTORS[n][0] for n in names} | {a: va, b: vb}
            best |= {"scale_rewards": SCALES.get(best["algorithm"], ("group",))[0], "use_bias_correction_kl": False}
        rows.append(best)
        uncovered -= {((x, best[x]), (y, best[y])) for x, y in itertools.combinations(names, 2)}
    return rows


def refused_rows() -> list[dict]:
    """One row per pair that cannot work (the rest of the row valid)."""
    base = {n: FACTORS[n][0] for n in FACTORS}
    rows = [base | {"algorithm": algo, "scale_rewards": scale}
            for algo, allowed in SCALES.items() for scale in FACTORS["scale_rewards"] if scale not in allowed]
    rows += [base | {"use_bias_correction_kl": True, "beta": 0.0},
             base | {"use_bias_correction_kl": True, "beta": 0.2, "kl_in_reward": True}]
    return rows


ROWS = pairwise_rows()


def stop_early_model_dir(path):
    """A tiny model whose generation config stops on 30 of its 100 tokens, so that rows end
    at different lengths and some before max_completion_length (mask_truncated_completions
    then keeps some rows)."""
    model = tiny_model()
    model.generation_config.eos_token_id = [2, *range(10, 39)]
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return stop_early_model_dir(tmp_path_factory.mktemp("stop-early"))


def digit_fraction(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]


PROMPTS = [{"prompt": f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n"} for i in range(8)]


def config(row: dict, out) -> grpo.GRPOConfig:
    return grpo.GRPOConfig(
        output_dir=str(out), num_generations=2, batch_size=4, micro_batch_size=2, max_completion_length=6,
        max_prompt_length=64, lora_r=2, learning_rate=1e-3, max_steps=1, save_steps=0, progress_bar=False,
        log_completions_steps=0, overlong_buffer=2, **row)


def first_update_gradient(row: dict, model_dir, out) -> tuple[float, torch.Tensor]:
    """(loss, gradient of every trainable tensor at the first optimizer update) of one step,
    from a policy moved away from its reference (LoRA B drawn from a fixed generator), so
    that a KL term has a gradient."""
    trainer = grpo.Trainer(str(model_dir), None, [digit_fraction], PROMPTS, config(row, out))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in trainer.named_trainable:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    grads: list[torch.Tensor] = []

    def record(optimizer, args, kwargs):
        if not grads:
            grads.append(torch.cat([p.grad.flatten() for _, p in trainer.named_trainable if p.grad is not None]))

    trainer.optimizer.register_step_pre_hook(record)
    metrics = trainer.step()
    assert "skipped" not in metrics, (row, metrics)
    return metrics["loss"], grads[0]


def test_the_covering_array_covers_every_runnable_pair():
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if refused({a: va, b: vb}) is None:
                assert any(r[a] == va and r[b] == vb for r in ROWS), (a, va, b, vb)
    assert all(refused(r) is None for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_combination_runs_and_its_kl_takes_effect(row, model_dir, tmp_path):
    loss, grad = first_update_gradient(row, model_dir, tmp_path / "a")
    assert math.isfinite(loss) and bool(torch.isfinite(grad).all()), row
    if row["beta"] > 0:
        _, without_kl = first_update_gradient(row | {"beta": 0.0, "use_bias_correction_kl": False}, model_dir,
                                              tmp_path / "b")
        assert not torch.allclose(grad, without_kl, rtol=1e-4, atol=1e-7), f"beta has no effect in {row}"


@pytest.mark.parametrize("row", refused_rows(), ids=lambda r: f"{r['algorithm']}-{r['scale_rewards']}-bias{r['use_bias_correction_kl']}-kl{r['kl_in_reward']}-b{r['beta']}")
def test_combination_that_cannot_work_is_refused_by_name(row, tmp_path):
    with pytest.raises(grpo.ConfigError) as err:
        config(row, tmp_path)
    message = str(err.value)
    conflicting = {"scale": ("scale_rewards", "algorithm"), "bias_kl": ("use_bias_correction_kl", "beta", "kl_in_reward")}
    assert all(name in message for name in conflicting[refused(row)]), message
