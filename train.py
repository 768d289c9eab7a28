"""Train a policy: SFT warm start and/or GRPO (and its variants) on a LoRA adapter.

    python train.py                                   # the embedded demo (offline, CPU)
    python train.py --config configs/qwen3-0.6b-gsm8k.yaml
    python train.py --model Qwen/Qwen3-0.6B --dataset openai/gsm8k --mode both
    python train.py --config X.yaml --learning_rate 1e-5 --resume_from_checkpoint latest
    python train.py --help                            # every config field, with its docstring
"""

from __future__ import annotations

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


def run(cfg) -> dict:
    """SFT and/or GRPO as `cfg.mode` says; returns the GRPO summary (or the SFT adapter path)."""
    import torch

    from grpo.model import add_reference_adapter, attach_adapters, load_base_model, load_tokenizer
    from grpo.sft import SFTTrainer
    from grpo.trainer import Trainer

    train_rows, sft_targets, eval_rows = build_datasets(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    base = load_base_model(cfg.model, load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)  # LoRA init
    model = attach_adapters(base, cfg, cfg.adapter_path)
    if cfg.mode in ("sft", "both"):
        adapter = SFTTrainer(model, tokenizer, train_rows, sft_targets, cfg).train()
        print(f"SFT adapter: {adapter}")
        if cfg.mode == "sft":
            return {"sft_adapter": str(adapter)}
        add_reference_adapter(model, adapter)  # GRPO's KL reference is the frozen SFT policy
    trainer = Trainer(model, tokenizer, cfg.reward_funcs, train_rows, cfg, eval_dataset=eval_rows)
    summary = trainer.train()
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


def main(argv: list[str] | None = None) -> int:
    from data import DataError
    from grpo.checkpoint import CheckpointError
    from grpo.config import ConfigError, parse_config, read_yaml
    from grpo.model import ModelLoadError
    from rewards import RewardError

    argv = sys.argv[1:] if argv is None else argv
    try:
        defaults = None
        if not argv:
            print(f"No arguments: running the embedded demo ({DEMO_CONFIG}).")
            defaults = read_yaml(DEMO_CONFIG)
        run(parse_config(argv, defaults=defaults))
    except (ConfigError, DataError, ModelLoadError, CheckpointError, RewardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
