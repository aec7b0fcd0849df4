"""rlhf: the three stages of RLHF (SFT, reward model, PPO) on any Hugging Face causal LM.

    from rlhf import SFTTrainer, SFTConfig, RewardTrainer, RewardConfig, PPOTrainer, PPOConfig, load_config

The trainers are imported on first use, so ``import rlhf.config`` or ``rlhf.demo`` stays light
(no torch or transformers import).
"""

from rlhf.config import (
    ArchitectureConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    TrainingConfig,
    load_config,
)
from rlhf.errors import UserError

__version__ = "0.1.0"

_LAZY = {
    "SFTTrainer": "rlhf.trainers.sft",
    "RewardTrainer": "rlhf.trainers.reward",
    "PPOTrainer": "rlhf.trainers.ppo",
    "run_pipeline": "rlhf.pipeline",
}

__all__ = [
    "ArchitectureConfig", "DataConfig", "LoggingConfig", "ModelConfig", "PipelineConfig", "PPOConfig",
    "PPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer", "TrainingConfig", "UserError",
    "load_config", "run_pipeline",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
