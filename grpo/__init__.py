"""grpo: a from-scratch GRPO/PPO fine-tuning library for small language models.

    import grpo
    config = grpo.GRPOConfig(output_dir="runs/x", num_generations=8, max_steps=100)
    trainer = grpo.Trainer(model="Qwen/Qwen3-0.6B", reward_funcs=["correctness"],
                           train_dataset=rows, config=config)
    trainer.train()
"""

from grpo.config import ConfigError, GRPOConfig, parse_config
from grpo.trainer import Callback, Trainer, TrainerState

__all__ = ["GRPOConfig", "ConfigError", "parse_config", "Trainer", "TrainerState", "Callback"]
__version__ = "0.1.0"
