"""Reward functions for the PPO trainer: one protocol, one implementation per tier.

The trainer calls `reward_fn(model=..., input_ids=..., attention_mask=..., response_mask=..., base_hidden=...)`
on its rollout batch (prompt + generated response, left padding allowed) and gets [B] scores without grad.
`uses_base_hidden=True` asks the trainer to pass the final hidden states (after the final norm) of the BASE
model (all adapters disabled) that its reference pass computed anyway, so the fast tier costs one matvec;
those hidden states should come from a forward with position ids following the attention mask
(`components.model_utils.position_ids_from_mask`), as in extract_features, for the features to match the ones the probe was
fitted on. If base_hidden is None the fast tier runs that base pass itself.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .extract import base_model_mode, final_hidden
from .features import pool_features


@runtime_checkable
class RewardFn(Protocol):
    uses_base_hidden: bool   # True: the trainer passes the base model's final hidden states (adapters disabled)

    def __call__(self, *, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, base_hidden: torch.Tensor | None = None) -> torch.Tensor:
        ...


class FastRewardFn:
    """The fast tier's linear probe on pooled base features: score = ((f - mean) / std) @ w + b."""
    uses_base_hidden = True

    def __init__(self, fast_model, lock=None):
        self.weight, self.bias, self.mean, self.std = fast_model.to_torch_head()
        self.lock = lock

    def _to(self, device):
        if self.weight.device != torch.device(device):
            self.weight, self.bias, self.mean, self.std = (t.to(device) for t in
                                                           (self.weight, self.bias, self.mean, self.std))

    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None) -> torch.Tensor:
        with torch.no_grad():
            if base_hidden is None:
                if self.lock is not None:
                    with self.lock, base_model_mode(model):
                        base_hidden = final_hidden(model, input_ids, attention_mask)
                else:
                    with base_model_mode(model):
                        base_hidden = final_hidden(model, input_ids, attention_mask)
            f = pool_features(base_hidden, attention_mask, response_mask)
            self._to(f.device)
            return ((f - self.mean) / self.std) @ self.weight + self.bias


class DeepRewardFn:
    """The deep tier: its own forward with only the reward adapter active (the policy adapter is switched off
    for that pass and restored after), head on the pooled final hidden states. When the deep model mixes in
    its probe (config.probe_weight > 0) it also reads the base model's hidden states, so it asks for them
    (uses_base_hidden=True) instead of running a second pass."""

    def __init__(self, deep_model):
        self.deep = deep_model
        self.uses_base_hidden = deep_model.probe_weight > 0

    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None) -> torch.Tensor:
        target = model
        if model is None or not _has_adapter(model, self.deep.adapter_name):
            target = self.deep.lm.model
        return self.deep.score_batch(target, input_ids, attention_mask, response_mask, base_hidden=base_hidden)


def _has_adapter(model, name: str) -> bool:
    return name in (getattr(model, "peft_config", None) or {})


def reward_fn_for_ppo(reward_model, lm=None) -> RewardFn:
    """The RewardFn of a FastRewardModel (fast tier) or a DeepRewardModel / DeepRewardTrainer (deep tier).

    lm: optional LoadedModel whose lock the fast tier takes if it must run the base pass itself.
    """
    from .deep import DeepRewardModel, DeepRewardTrainer
    from .fast import FastRewardModel
    if isinstance(reward_model, DeepRewardTrainer):
        reward_model = reward_model.model
    if isinstance(reward_model, DeepRewardModel):
        return DeepRewardFn(reward_model)
    if isinstance(reward_model, FastRewardModel):
        return FastRewardFn(reward_model, lock=getattr(lm, "lock", None))
    raise TypeError(f"no PPO reward function for {type(reward_model).__name__}")

