"""Training algorithms on one shared base with a LoRA adapter: PPO, RLOO, GRPO, DPO, KTO.

    engine/          what every algorithm runs on: rollout.py (sampling, the policy/reference passes), online.py
                     (OnlineEngine: collect, the mini-batch update loop; passes.py: which shortcuts its passes
                     take; evaluation.py: samples and the watch's probe; value_head.py), offline.py
                     (OfflineEngine: labelled rows -> sequence log-probs -> update), adapter.py (the LoRA policy,
                     export), acceleration.py (compiled layers, packed rows), checkpoint.py (checkpoints, the
                     online engine's export), ops.py (shared math)
    ppo.py, rloo.py, grpo.py, dpo.py, kto.py     one algorithm each: its math (pure functions) and its step
    group.py         what RLOO and GRPO share (k completions a prompt)
    config.py        the config fields the algorithms share (OnlineConfig: also the online engine's settings);
                     ppo_config.py: PPOConfig
    rewards.py       reward functions for the online algorithms; memory.py: peak-memory estimate;
    watch.py         the reward-hacking watch

    from rlhf_studio.components.training import config_class, build_trainer
    cfg = config_class("dpo")(steps=20, beta=0.1)
    trainer = build_trainer(lm, "dpo", cfg, rows=pairs)      # pairs: [{"prompt", "chosen", "rejected"}]
    while trainer.step_count < cfg.steps: print(trainer.step())

Every trainer has the same surface: `step()`, `step_count`, `notes`, `state_bytes()` / `load_state_bytes()`,
`save_adapter(path)`; so the studio's job process runs any of them the same way.
"""
from __future__ import annotations

ALGORITHMS = ("ppo", "rloo", "grpo", "dpo", "kto")
OFFLINE = ("dpo", "kto")        # learn from labels; the others sample and score with a reward model


def config_class(algorithm: str):
    """The config dataclass of `algorithm`."""
    if algorithm == "ppo":
        from .ppo_config import PPOConfig
        return PPOConfig
    if algorithm == "dpo":
        from .dpo import DPOConfig
        return DPOConfig
    if algorithm == "kto":
        from .kto import KTOConfig
        return KTOConfig
    if algorithm == "rloo":
        from .rloo import RLOOConfig
        return RLOOConfig
    if algorithm == "grpo":
        from .grpo import GRPOConfig
        return GRPOConfig
    raise ValueError(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")


def build_trainer(lm, algorithm: str, config, *, rows: list | None = None, prompts: list | None = None,
                  reward_fn=None):
    """The trainer of `algorithm`: offline ones take `rows` (labelled texts), online ones `prompts` and a
    `reward_fn` (components/training/rewards.py)."""
    if algorithm == "ppo":
        from .ppo import PPOTrainer
        return PPOTrainer(lm, reward_fn, config, prompts)
    if algorithm == "dpo":
        from .dpo import DPOTrainer
        return DPOTrainer(lm, config, rows)
    if algorithm == "kto":
        from .kto import KTOTrainer
        return KTOTrainer(lm, config, rows)
    if algorithm == "rloo":
        from .rloo import RLOOTrainer
        return RLOOTrainer(lm, reward_fn, config, prompts)
    if algorithm == "grpo":
        from .grpo import GRPOTrainer
        return GRPOTrainer(lm, reward_fn, config, prompts)
    raise ValueError(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
