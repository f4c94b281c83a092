"""The value head: a linear head on the policy's final hidden states (the trunk is shared, so one forward gives
log-probs and values). Only PPO trains it; the online engine keeps it for every algorithm (at zero where unused),
as its checkpoints hold it."""
from __future__ import annotations

import torch

from ...model_utils import causal_lm_of
from ..rewards import value_head_from_pooled_head


def new_value_head(model, device) -> torch.nn.Linear:
    """An fp32 Linear(hidden size -> 1) on `device` (drawn from the global RNG, as nn.Linear is)."""
    mcfg = causal_lm_of(model).config
    H = (mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg).hidden_size
    return torch.nn.Linear(H, 1).to(device, torch.float32)


@torch.no_grad()
def init_value_head(value_head: torch.nn.Linear, reward_fn, from_reward: bool) -> str:
    """Zero the head, then, with `from_reward`, start it from the reward head's weights where `reward_fn` gives
    them (`value_head_init()`, or a linear head on pooled features). Returns where it started: "reward" or
    "zeros"."""
    value_head.weight.zero_()
    value_head.bias.zero_()
    if not from_reward:
        return "zeros"
    init = getattr(reward_fn, "value_head_init", None)
    if callable(init):
        w, b = init()
    elif all(isinstance(getattr(reward_fn, a, None), torch.Tensor) for a in ("weight", "mean", "std")):
        # a linear head on pooled features (e.g. components.reward.ppo_reward.FastRewardFn)
        w, b = value_head_from_pooled_head(reward_fn.weight, float(getattr(reward_fn, "bias", 0.0)), reward_fn.mean,
                                           reward_fn.std)
    else:
        return "zeros"
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if w.numel() != value_head.weight.numel():
        return "zeros"
    value_head.weight.copy_(w.view_as(value_head.weight).to(value_head.weight.device))
    value_head.bias.fill_(float(b))
    return "reward"
