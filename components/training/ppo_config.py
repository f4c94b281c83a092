"""PPOConfig: every knob of one PPO run, documented field by field (the fields every algorithm shares, and those
of the sampling algorithms and the online engine, are components/training/config.py's TrainConfig and
OnlineConfig).

The config is stored with the run, so it must round-trip through JSON: `to_dict()` gives plain Python values and
`from_dict()` rebuilds it (unknown keys are rejected so that a typo does not silently fall back to a default;
keys of retired fields, which runs stored before their removal hold, are dropped).
The defaults follow "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) where they apply,
scaled down to what a laptop can run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import OnlineConfig, need


@dataclass
class PPOConfig(OnlineConfig):
    # ---- run length and batch shape -------------------------------------------------------------------
    steps: int = 100
    """PPO iterations (each = one rollout of `batch_size` prompts + `ppo_epochs` passes of optimisation)."""
    batch_size: int = 8
    """Prompts sampled per step (one response each)."""
    ppo_epochs: int = 4
    """Passes over the rollout batch, each over freshly shuffled minibatches."""

    # ---- optimiser -----------------------------------------------------------------------------------------
    lr: float = 1e-4
    """AdamW learning rate of the LoRA and value-head parameters."""

    # ---- reward shaping and KL penalty -------------------------------------------------------------------
    adaptive_kl: bool = False
    """Adapt beta towards `kl_target` (Ziegler et al. 2019 proportional controller)."""
    kl_target: float = 6.0
    """Target sequence-level KL (nats, summed over response tokens) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller: larger = slower adaptation."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (scale only, the mean is kept) over the batch before GAE."""

    # ---- advantage estimation -------------------------------------------------------------------------------
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""

    # ---- losses --------------------------------------------------------------------------------------------------
    cliprange_value: float = 0.2
    """Clip of the value prediction around its rollout value in the value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (value head shares the policy trunk)."""
    ent_coef: float = 0.0
    """Entropy bonus weight (0 = off; the entropy is still reported)."""

    # ---- value head -------------------------------------------------------------------------------------------
    value_head_init: str = "reward"
    """"reward": start the value head from the reward head's weights when the reward function provides them
    (`reward_fn.value_head_init()`), else zeros. "zeros": weight and bias 0."""

    # ---- bookkeeping -------------------------------------------------------------------------------------------

    # Fields removed from PPOConfig that configs stored with earlier runs (and their checkpoints) still hold;
    # none changed the math, so a stored run resumes without them. stack_sibling_bases: one base matmul for
    # q/k/v and gate/up in compiled passes, slower on a GPU and a CPU alike (docs/GPU.md, run 12).
    RETIRED_KEYS: ClassVar[frozenset] = frozenset({"stack_sibling_bases"})
    UPPER_BOUNDS: ClassVar[dict] = {
        **OnlineConfig.UPPER_BOUNDS, "batch_size": 4096, "ppo_epochs": 100, "kl_target": 1e4,
        "kl_horizon": 10**9, "cliprange_value": 1e4, "vf_coef": 1e3, "ent_coef": 100.0}

    def check(self) -> None:
        super().check()
        need(self.batch_size >= 1, "batch sizes must be >= 1")
        need(self.batch_size % self.mini_batch_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        need(self.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        need(self.kl_target > 0 and self.kl_horizon > 0, "kl_target and kl_horizon must be > 0")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        need(self.cliprange_value > 0, "clip ranges must be > 0")
        need(self.vf_coef >= 0 and self.ent_coef >= 0, "vf_coef and ent_coef must be >= 0")
        need(self.value_head_init in ("reward", "zeros"), "value_head_init must be 'reward' or 'zeros'")

    def samples_per_step(self) -> int:
        return self.batch_size

    def epochs_per_step(self) -> int:
        return self.ppo_epochs

    def engine_config(self) -> "PPOConfig":
        return self
