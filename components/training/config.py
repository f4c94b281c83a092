"""The settings every algorithm shares (adapter, optimiser, lengths, bookkeeping) and their checks.

Each algorithm's config (DPOConfig, KTOConfig, RLOOConfig, GRPOConfig; PPO keeps components.ppo.PPOConfig)
subclasses `TrainConfig`, adds its own fields, each documented, and is stored with the run as JSON:
`to_dict()` gives plain values, `from_dict()` rebuilds it and refuses unknown keys (a typo must not silently
fall back to a default). `engine_config()` maps it onto the PPOConfig the shared engine and the memory estimate
understand (same LoRA, same lengths, the batch shapes this algorithm runs).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..ppo.config import PPOConfig


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class TrainConfig:
    # ---- run length -------------------------------------------------------------------------------------
    steps: int = 50
    """Optimiser steps (each on one batch)."""

    # ---- optimiser --------------------------------------------------------------------------------------
    lr: float = 5e-5
    """AdamW learning rate of the LoRA parameters."""
    lr_schedule: str = "constant"
    """"constant" or "linear" (annealed linearly to 0 over `steps`)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Global gradient-norm clip over the LoRA parameters; 0 = off."""

    # ---- LoRA adapter of the policy ---------------------------------------------------------------------
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """peft target_modules: "all-linear" (every linear layer except the output head) or a list of names."""
    adapter_name: str = "policy"
    """Name of the trained adapter on `lm.model`; other adapters (e.g. a reward adapter) are kept."""

    # ---- lengths ----------------------------------------------------------------------------------------
    max_prompt_tokens: int = 256
    """Prompts longer than this (in tokens, after the chat template) are truncated from the left."""

    # ---- the engine's shortcuts (same math; components/ppo/rollout.py, components/fused_lora.py) -----------
    share_prompt_prefix: bool = True
    """Run the prompt prefix all rows share (a chat template's system prompt) once per pass."""
    fused_lora: bool = True
    """Add the LoRA product inside the base layer's matmul in training passes (peft's forward when False)."""
    pack_rows: bool = True
    """Where no prefix is shared, run the rows packed into one sequence without padding."""

    # ---- bookkeeping ------------------------------------------------------------------------------------
    seed: int = 0
    """Seeds the LoRA init, the data order and sampling."""
    checkpoint_every: int = 0
    """The job stores a resumable checkpoint every N steps (and always at the end); 0 = only at the end."""

    def __post_init__(self) -> None:
        self.validate()

    # subclasses: largest accepted value of each numeric field (a typo with extra zeros is refused)
    UPPER_BOUNDS = {"steps": 1_000_000, "lr": 1.0, "weight_decay": 10.0, "max_grad_norm": 1e6, "lora_r": 1024,
                    "lora_alpha": 65536, "max_prompt_tokens": 32768, "seed": 2**63 - 1,
                    "checkpoint_every": 1_000_000}

    def validate(self) -> None:
        for f in dataclasses.fields(self):        # types first: a string or NaN from a form must not slip through
            v = getattr(self, f.name)
            if f.type in ("int", int):
                need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be a whole number, got {v!r}")
            elif f.type in ("float", float):
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                     f"{f.name} must be a finite number, got {v!r}")
            elif f.type in ("bool", bool):
                need(isinstance(v, bool), f"{f.name} must be true or false, got {v!r}")
        for name, top in self.UPPER_BOUNDS.items():
            need(getattr(self, name) <= top, f"{name} must be at most {top:g}, got {getattr(self, name)!r}")
        need(self.steps >= 1, "steps must be >= 1")
        need(self.lr > 0, "lr must be > 0")
        need(self.lr_schedule in ("constant", "linear"), "lr_schedule must be 'constant' or 'linear'")
        need(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0")
        need(self.lora_r >= 1 and self.lora_alpha >= 1, "lora_r and lora_alpha must be >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(bool(self.adapter_name) and self.adapter_name.replace("_", "").replace("-", "").isalnum(),
             "adapter_name must be letters, digits, '-' or '_'")
        self.check()

    def check(self) -> None:
        """The algorithm's own rules (subclasses)."""

    def lr_at(self, step: int) -> float:
        return self.lr * max(0.0, 1.0 - step / self.steps) if self.lr_schedule == "linear" else self.lr

    def engine_config(self) -> PPOConfig:
        """The PPOConfig of the same LoRA, lengths and batch shape (for the engine and the memory estimate)."""
        raise NotImplementedError

    def _shared_engine_fields(self) -> dict:
        keep = ("lr", "lr_schedule", "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "adapter_name", "max_prompt_tokens", "share_prompt_prefix", "fused_lora",
                "pack_rows", "seed")
        return {k: getattr(self, k) for k in keep}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        json.dumps(d)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**d)
