"""The GRPO trainer on a tiny 2-layer model with a character-level tokenizer (CPU, seconds).

The toy task: the reward is the fraction of digits in an 8-character completion. A random
model writes digits ~4% of the time (10 digit characters out of 100 tokens); RL must push
that to ~100%. Learning it proves the signs of the advantage, the ratio and the clipping.
"""

from __future__ import annotations

import json

import pytest
import torch

import grpo
from grpo.testing import tiny_model, tiny_tokenizer

PROMPTS = [{"prompt": f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n"} for i in range(16)]


def digit_fraction(prompts, completions, **columns):
    """Fraction of the completion's characters that are digits ("a1b2" -> 0.5; "" -> 0)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]


def make_trainer(tmp_path, model=None, **overrides) -> grpo.Trainer:
    settings = dict(
        output_dir=str(tmp_path / "run"), num_generations=8, batch_size=32, micro_batch_size=8,
        max_completion_length=8, max_steps=4, learning_rate=2e-2, lr_scheduler="constant", beta=0.0,
        lora_r=8, save_steps=0, progress_bar=False, log_completions_steps=0,
        cpu_dtype="float32",  # the same numbers on every CPU; bf16 is tested in test_precision.py
    )
    settings.update(overrides)
    config = grpo.GRPOConfig(**settings)
    return grpo.Trainer(model if model is not None else tiny_model(), tiny_tokenizer(), [digit_fraction],
                        PROMPTS, config)


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k and ".default." in k}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- learning
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_reward_rises_on_toy_task(tmp_path, loss_type):
    # dr_grpo's constant normalizer (B * T_max) is the same as bnpo's here (all completions
    # run to the 8-token limit), so one learning rate fits every mode.
    trainer = make_trainer(tmp_path, loss_type=loss_type, max_steps=12)
    trainer.train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run")]
    assert rewards[0] < 0.3, rewards
    assert max(rewards) >= 0.9, rewards
    assert sum(rewards[-2:]) / 2 >= 0.9, rewards


@pytest.mark.parametrize("algorithm", ["rloo", "gspo", "reinforce_pp"])
def test_variants_learn_toy_task(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, algorithm=algorithm, max_steps=12)
    trainer.train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run")]
    assert rewards[0] < 0.3 and sum(rewards[-2:]) / 2 >= 0.9, rewards


# ---------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_four_micro_batches_of_two_equal_one_batch_of_eight(tmp_path, loss_type):
    """The summed gradient of 4 micro-batches of 2 equals the gradient of 1 batch of 8,
    with clipping active (old log-probs perturbed), a KL term and ragged masks."""
    grads = []
    for micro in (2, 8):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path, tiny_model(seed=1), num_generations=4, batch_size=8,
                               micro_batch_size=micro, loss_type=loss_type, beta=0.1)
        with torch.no_grad():  # give the policy a nonzero LoRA B so policy != reference
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
        rollout = trainer.generate(*trainer.draw(2))  # a fresh trainer: the same seeds
        rollout.completion_mask[0, 3:] = 0  # ragged lengths
        rollout.completion_mask[5, 1:] = 0
        g = torch.Generator().manual_seed(5)
        adv = torch.randn(8, generator=g)
        mask = rollout.completion_mask.float()
        old_logp, ref_logp = trainer.frozen_logprobs(rollout)
        with torch.no_grad():
            current = torch.cat([trainer.logprobs(rollout, mb) for mb in trainer.micro_batches(8)])
        old_logp = current + 0.3 * torch.randn(current.shape, generator=g)  # ratios far from 1: clipping
        stats = trainer.accumulate_gradients(rollout, adv, mask, old_logp, ref_logp)
        assert stats["clip_ratio"] > 0
        grads.append({k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None})
    small, big = grads
    assert small.keys() == big.keys() and len(small) > 0
    # Each entry sums, in another order, terms as large as the tensor's largest entry, so its
    # float32 rounding follows that scale (measured up to 1e-6 of it across ISAs), not its own size.
    for k in small:
        torch.testing.assert_close(small[k], big[k], rtol=1e-5, atol=1e-5 * big[k].abs().max().item())


def test_gradient_checkpointing_same_gradients_fewer_saved_activations(tmp_path):
    """Activation checkpointing recomputes the layers in the backward: the same LoRA gradients
    (to float32 rounding), while the autograd graph keeps far fewer bytes between forward and
    backward (measured with saved_tensors_hooks: the tensors saved for the backward)."""
    grads, saved = [], []
    for checkpointing in (False, True):
        trainer = make_trainer(tmp_path, tiny_model(seed=1), num_generations=4, batch_size=8,
                               micro_batch_size=8, beta=0.1, gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
        rollout = trainer.generate(*trainer.draw(2))
        adv = torch.randn(8, generator=torch.Generator().manual_seed(5))
        old_logp, ref_logp = trainer.frozen_logprobs(rollout)
        nbytes = [0]

        def pack(t):
            nbytes[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.accumulate_gradients(rollout, adv, rollout.completion_mask.float(), old_logp, ref_logp)
        saved.append(nbytes[0])
        grads.append({k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7)
    assert saved[1] < 0.5 * saved[0], saved


# ---------------------------------------------------------------------------- reference
def test_kl_is_zero_at_step_zero_and_base_stays_frozen(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.5, max_steps=3)
    base_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_" not in k}
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["kl"] == 0.0  # LoRA B starts at 0: policy == reference, bit for bit
    assert metrics[-1]["kl"] > 0.0  # and the policy has moved since
    for k, v in trainer.model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k


def test_reference_adapter_never_changes(tmp_path):
    """Starting from an adapter (e.g. SFT's), the frozen copy is the reference: its weights
    stay bit-identical while the policy copy trains, and the KL starts at exactly 0."""
    first = make_trainer(tmp_path / "a", max_steps=2)
    first.train()
    adapter = tmp_path / "a" / "run" / "checkpoint-2"
    trainer = make_trainer(tmp_path / "b", beta=0.5, max_steps=3, adapter_path=str(adapter))
    ref_before = {k: v.clone() for k, v in trainer.model.named_parameters() if ".reference." in k}
    policy_before = lora_state(trainer)
    assert ref_before and all(not v.requires_grad for k, v in trainer.model.named_parameters() if ".reference." in k)
    trainer.train()
    for k, v in trainer.model.named_parameters():
        if ".reference." in k:
            assert torch.equal(v, ref_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in lora_state(trainer).items())
    metrics = read_metrics(tmp_path / "b" / "run")
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0.0


# ---------------------------------------------------------------------------- checkpoints
def test_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, a new process-like trainer resuming, 2 more steps."""
    common = dict(max_steps=4, save_steps=2, beta=0.1, lora_dropout=0.1, temperature=0.9)
    straight = make_trainer(tmp_path / "straight", **common)
    straight.train()

    first = make_trainer(tmp_path / "split", **{**common, "max_steps": 2})
    first.train()
    resumed = make_trainer(tmp_path / "split", **common, resume_from_checkpoint="latest")
    resumed.train()

    a, b = lora_state(straight), lora_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_metrics(tmp_path / "straight" / "run"), read_metrics(tmp_path / "split" / "run")
    drop = ("rollout_s", "update_s", "tokens_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
           [{k: v for k, v in m.items() if k not in drop} for m in mb]


def test_checkpoint_is_a_peft_adapter(tmp_path):
    from peft import PeftModel

    trainer = make_trainer(tmp_path, max_steps=2, save_steps=1, save_total_limit=1)
    trainer.train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    loaded = PeftModel.from_pretrained(tiny_model(), str(run / "checkpoint-2"))
    mine = lora_state(trainer)
    theirs = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)


def test_resume_latest_without_checkpoint_is_a_clear_error(tmp_path):
    from grpo.checkpoint import CheckpointError

    trainer = make_trainer(tmp_path, resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        trainer.train()


# ---------------------------------------------------------------------------- config
def test_config_rejects_invalid_combinations():
    with pytest.raises(grpo.ConfigError, match="not a multiple of num_generations=8"):
        grpo.GRPOConfig(batch_size=12)
    with pytest.raises(grpo.ConfigError, match="beta=-0.1 must be >= 0"):
        grpo.GRPOConfig(beta=-0.1)
    with pytest.raises(grpo.ConfigError, match="at least 2 completions"):
        grpo.GRPOConfig(num_generations=1, batch_size=4, micro_batch_size=4)
    with pytest.raises(grpo.ConfigError, match="did you mean 'learning_rate'"):
        grpo.GRPOConfig.from_dict({"learnig_rate": 1e-5})
    with pytest.raises(grpo.ConfigError, match="max_steps='ten' is not a valid int"):
        grpo.parse_config(["--max_steps", "ten"])


def test_config_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("learning_rate: 1.0e-4\nmax_steps: 7\nreward_funcs: [correctness]\n")
    cfg = grpo.parse_config(["--config", str(path), "--learning_rate", "3e-5", "--load_in_4bit", "false"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.reward_funcs, cfg.load_in_4bit) == (3e-5, 7, ["correctness"], False)
    # algorithm defaults fill what was not given; an explicit value wins
    assert grpo.GRPOConfig(algorithm="dapo").epsilon_high == 0.28
    assert grpo.GRPOConfig(algorithm="dapo", epsilon_high=0.3).epsilon_high == 0.3
    assert grpo.GRPOConfig(algorithm="dr_grpo").scale_rewards == "none"


def test_every_config_field_has_a_docstring():
    import dataclasses

    from grpo.config import field_docs

    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(grpo.GRPOConfig) if not docs.get(f.name)]
    assert missing == []


def test_lr_schedule_hand_worked():
    from grpo.optim import lr_factor

    # warmup 2 of 10 steps: 1/3, 2/3, then cosine over the 8 remaining: step 6 is halfway -> 0.5
    assert lr_factor(0, warmup_steps=2, total_steps=10, kind="cosine") == pytest.approx(1 / 3)
    assert lr_factor(1, warmup_steps=2, total_steps=10, kind="cosine") == pytest.approx(2 / 3)
    assert lr_factor(2, warmup_steps=2, total_steps=10, kind="cosine") == pytest.approx(1.0)
    assert lr_factor(6, warmup_steps=2, total_steps=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(6, warmup_steps=2, total_steps=10, kind="linear") == pytest.approx(0.5)
    assert lr_factor(9, warmup_steps=2, total_steps=10, kind="constant") == 1.0


def test_evaluation_during_training_is_logged(tmp_path):
    eval_rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    config = grpo.GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=4, batch_size=8, micro_batch_size=8,
                             max_completion_length=6, max_steps=2, eval_steps=2, eval_limit=2, beta=0.0,
                             save_steps=0, progress_bar=False, log_completions_steps=0)
    trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_fraction], PROMPTS, config, eval_dataset=eval_rows)
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    assert "eval/pass@1" not in metrics[0]
    assert metrics[1]["eval/n_questions"] == 2
    assert 0.0 <= metrics[1]["eval/pass@1"] <= 1.0 and 0.0 <= metrics[1]["eval/format_rate"] <= 1.0
