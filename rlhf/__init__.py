"""rlhf: the three stages of RLHF (SFT, reward model, PPO) on any Hugging Face causal LM."""

from rlhf.config import (
    ArchitectureConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    TrainingConfig,
    load_config,
)
from rlhf.errors import UserError
from rlhf.trainers.ppo import PPOTrainer
from rlhf.trainers.reward import RewardTrainer
from rlhf.trainers.sft import SFTTrainer

__version__ = "0.1.0"

__all__ = [
    "ArchitectureConfig", "DataConfig", "LoggingConfig", "ModelConfig", "PPOConfig", "PPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer",
    "TrainingConfig", "UserError", "load_config",
]
