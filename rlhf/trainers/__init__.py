"""One trainer per stage: sft.SFTTrainer (later reward.RewardTrainer, ppo.PPOTrainer)."""
