"""LoRA PPO on one shared base model: maths (core), sampling (rollout), the trainer, memory estimate.

    from components.ppo import PPOConfig, PPOTrainer
    trainer = PPOTrainer(lm, reward_fn, PPOConfig(steps=50), prompts)
    trainer.train(callback=print, stop=lambda: False)
"""
from .config import PPOConfig
from .memory import estimate_memory
from .rewards import LinearHeadReward, RewardFn, TokenCountReward, value_head_from_pooled_head
from .trainer import PPOTrainer, generate_with_adapter

__all__ = ["PPOConfig", "PPOTrainer", "generate_with_adapter", "estimate_memory", "RewardFn", "LinearHeadReward",
           "TokenCountReward", "value_head_from_pooled_head"]
