"""Training recipes, each a short file reading as its paper's numbered steps: SFT, the reward model, PPO-ptx (GRPO/RLOO), DPO."""
