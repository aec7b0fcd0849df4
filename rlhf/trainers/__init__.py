"""One trainer per stage: sft.SFTTrainer, reward.RewardTrainer, ppo.PPOTrainer."""
