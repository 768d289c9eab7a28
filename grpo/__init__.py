"""grpo: a from-scratch GRPO/PPO fine-tuning library for small language models.

    import grpo
    config = grpo.GRPOConfig(output_dir="runs/x", num_generations=8, max_steps=100)
    trainer = grpo.Trainer(model="Qwen/Qwen3-0.6B", reward_funcs=["correctness"],
                           train_dataset=rows, config=config)
    trainer.train()
"""

import logging as _logging
import warnings as _warnings


class _DropBnbKernelsHubNotice(_logging.Filter):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: ..." at
    import on CPUs with AVX512-BF16: it would download that kernel from the hub (impossible
    offline, and needs the `kernels` package); its fallback is correct and this library never
    uses that kernel (on CPU it dequantizes to float32). Installed here, before anything of ours
    imports peft or bitsandbytes (peft imports bitsandbytes), and dropping only that message."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBnbKernelsHubNotice())
# peft 0.21.2 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a
# model (peft/peft_model.py:184): a FutureWarning about peft's code that no user can act on.
# Only that message is dropped; every other warning shows as usual.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                         category=FutureWarning, module="transformers.modeling_utils")

from grpo.config import ConfigError, GRPOConfig, parse_config  # noqa: E402
from grpo.trainer import Callback, Trainer, TrainerState  # noqa: E402

__all__ = ["GRPOConfig", "ConfigError", "parse_config", "Trainer", "TrainerState", "Callback"]
__version__ = "0.1.0"
