"""Train a policy: SFT warm start and/or GRPO (and its variants) on a LoRA adapter.

    python train.py                                   # the embedded demo (offline, CPU)
    python train.py --config configs/qwen3-0.6b-gsm8k.yaml
    python train.py --model Qwen/Qwen3-0.6B --dataset openai/gsm8k --mode both
    python train.py --config X.yaml --learning_rate 1e-5 --resume_from_checkpoint latest
    python train.py --help                            # every config field, with its docstring
    torchrun --nproc_per_node 4 train.py --config X.yaml   # data-parallel (README: multi-GPU)

Exit codes: 0 done; 2 bad input (`error:` names it); 1 the run failed (NaNs every step,
out of memory; `error:` says what to change); 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint (the message says how to resume).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def build_datasets(cfg):
    """(prompt rows for training, SFT targets, eval rows or None) from the config."""
    from data import get_format, load_gsm8k, make_prompt_rows, sft_target

    fmt = get_format(cfg.prompt_format)
    rows = load_gsm8k(cfg.dataset, cfg.dataset_split, limit=cfg.dataset_limit)
    eval_rows = None
    if cfg.eval_dataset:
        eval_rows = make_prompt_rows(load_gsm8k(cfg.eval_dataset, cfg.eval_split, limit=cfg.eval_limit), fmt)
    return make_prompt_rows(rows, fmt), [sft_target(r, fmt) for r in rows], eval_rows


def write_plots(run_dir: str) -> list:
    """PNG learning curves of the run (grpo.plot); skipped with a note when matplotlib is missing."""
    from grpo.plot import PlotError, plot_run

    try:
        return plot_run(run_dir)
    except PlotError as err:
        print(f"(no plots: {err})")
        return []


def load_rewards(cfg) -> list:
    """The functions of `cfg.reward_funcs` (registry names or `module:function` paths),
    resolved before the slow model load so that a bad name fails at once."""
    from rewards import get_reward

    return [get_reward(name) for name in cfg.reward_funcs] if cfg.mode != "sft" else []


def check_resume(cfg) -> None:
    """Fail before the model load when the checkpoint to resume was written with another
    LoRA shape or algorithm (grpo.config.RESUME_KEYS). A missing `latest` is left to the
    trainers (with --mode both the SFT stage resumes first)."""
    from grpo.checkpoint import list_checkpoints, resolve_checkpoint
    from grpo.config import check_resume_config, read_yaml

    spec = cfg.resume_from_checkpoint
    if not spec or (spec == "latest" and not list_checkpoints(cfg.output_dir)):
        return
    path = resolve_checkpoint(spec, cfg.output_dir)
    if (path / "config.yaml").is_file():
        check_resume_config(read_yaml(path / "config.yaml"), cfg, path)


def run(cfg) -> dict:
    """SFT and/or GRPO as `cfg.mode` says; returns the GRPO summary (or the SFT adapter path)."""
    from grpo import distributed
    from grpo.rundir import open_run

    dist = distributed.setup()  # before loading: picks this rank's GPU under torchrun
    distributed.check_config(cfg, dist)
    train_rows, sft_targets, eval_rows = build_datasets(cfg)
    reward_funcs = load_rewards(cfg)
    check_resume(cfg)
    # One run in the folder: locked for SFT and GRPO together, and refused (or moved aside with
    # --overwrite_output_dir) if it holds another run, before any model is loaded.
    with open_run(cfg.output_dir, resume=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite_output_dir,
                  main=dist.is_main):
        return train_models(cfg, dist, train_rows, sft_targets, eval_rows, reward_funcs)


def train_models(cfg, dist, train_rows, sft_targets, eval_rows, reward_funcs) -> dict:
    """Load the model, then SFT and/or GRPO; `run` calls it inside the claimed, locked folder."""
    import torch

    from grpo.checkpoint import list_checkpoints
    from grpo.model import add_reference_adapter, attach_adapters, load_base_model, load_tokenizer
    from grpo.sft import SFTTrainer
    from grpo.trainer import Trainer

    say = print if dist.is_main else (lambda *a, **k: None)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    base = load_base_model(cfg.model, load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)  # LoRA init
    model = attach_adapters(base, cfg, cfg.adapter_path)
    if cfg.mode in ("sft", "both"):
        sft = SFTTrainer(model, tokenizer, train_rows, sft_targets, cfg)
        adapter = sft.train()
        if sft.stopped_by:
            return {"stopped_by": sft.stopped_by, "steps": sft.state.step, "run_dir": str(sft.run_dir)}
        say(f"SFT adapter: {adapter}")
        if cfg.mode == "sft":
            return {"sft_adapter": str(adapter)}
        add_reference_adapter(model, adapter)  # GRPO's KL reference is the frozen SFT policy
        if cfg.resume_from_checkpoint == "latest" and not list_checkpoints(cfg.output_dir):
            cfg = dataclasses.replace(cfg, resume_from_checkpoint=None)  # SFT resumed; GRPO starts now
    trainer = Trainer(model, tokenizer, reward_funcs, train_rows, cfg, eval_dataset=eval_rows)
    summary = trainer.train()
    if summary.get("stopped_by") or not dist.is_main:
        return summary
    if not summary["last_metrics"]:  # resumed at or past max_steps: no step ran, so no rewards to report
        print(f"\nGRPO: nothing left to run; {summary['run_dir']}/checkpoint-{summary['steps']} is the last "
              f"checkpoint (max_steps={cfg.max_steps}).")
        return summary
    plots = write_plots(summary["run_dir"])
    print(
        f"\nGRPO: {summary['steps']} steps in {summary['run_dir']}\n"
        f"  mean reward, first steps: {summary['reward_first']:.3f}\n"
        f"  mean reward, last steps:  {summary['reward_last']:.3f}\n"
        f"  adapter: {summary['run_dir']}/checkpoint-{summary['steps']} "
        f"(load with peft.PeftModel.from_pretrained)\n"
        f"  metrics: {summary['run_dir']}/metrics.jsonl"
        + (f"\n  plots: {Path(plots[0]).parent}/ ({len(plots)} PNGs)" if plots else "")
    )
    return summary


def resume_hint(argv: list[str]) -> str:
    """The command that continues this run: its flags, with `--resume_from_checkpoint latest`."""
    args = list(argv) or ["--config", str(DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1]))]
    for i, a in enumerate(args):
        if a == "--resume_from_checkpoint" and i + 1 < len(args):
            del args[i : i + 2]
            break
    return "python train.py " + " ".join(args + ["--resume_from_checkpoint", "latest"])


def main(argv: list[str] | None = None) -> int:
    from data import DataError
    from grpo.checkpoint import CheckpointError
    from grpo.config import ConfigError, parse_config, read_yaml
    from grpo.distributed import shutdown
    from grpo.faults import TrainingError, exit_code
    from grpo.model import ModelLoadError
    from rewards import RewardError

    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        defaults = None
        if not argv:
            print(f"No arguments: running the embedded demo ({DEMO_CONFIG}).")
            defaults = read_yaml(DEMO_CONFIG)
        cfg = parse_config(argv, defaults=defaults)
        try:
            summary = run(cfg)
        except SystemExit as exc:  # sys.exit() from user code (a callback, a reward's library): not a finished run
            raise TrainingError(f"something called sys.exit({exc.code!r}) during the run, which did not finish; "
                                "the last complete checkpoint is kept. Look for sys.exit / exit() in your "
                                "callbacks and reward functions.") from exc
        finally:
            shutdown()
    except (ConfigError, DataError, ModelLoadError, CheckpointError, RewardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: the step was abandoned, nothing half-written
        where = f" in {cfg.output_dir}" if cfg is not None else ""
        print(f"\ninterrupted; the last complete checkpoint{where} is intact. Continue with:\n  "
              f"{resume_hint(argv)}", file=sys.stderr)
        return 130
    if summary.get("stopped_by"):
        print(f"\nstopped by {summary['stopped_by']} at step {summary['steps']}; checkpoint written in "
              f"{summary['run_dir']}. Continue with:\n  {resume_hint(argv)}", file=sys.stderr)
        name = summary["stopped_by"]
        return exit_code(name) if name in ("SIGINT", "SIGTERM") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
