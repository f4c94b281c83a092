"""The reward protocol the online engine calls (defined in components/reward/ppo_reward.py), and two small reward
functions that implement it.

The app's reward functions live in `components.reward.ppo_reward`; the ones here are for tests, benchmarks and
the GPU script: a linear head on pooled base features (`LinearHeadReward`) and a token counter
(`TokenCountReward`).

    class RewardFn(Protocol):
        uses_base_hidden: bool   # True: the trainer passes the base model's final hidden states (adapters
                                 # disabled) from its reference pass, so scoring needs no forward of its own
        def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None) -> Tensor: ...
        # optional: value_head_init() -> (weight [H], bias float): a per-token head the value head starts from

`input_ids`, `attention_mask`, `response_mask` are [B, T] over prompt + response (left-padded prompt,
right-padded response; attention_mask is 0 after EOS); the call returns [B] float scores without grad.
A reward function that runs `model` itself with its own adapter may switch adapters; the trainer re-activates
the policy adapter afterwards.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..reward.features import pool_features
from ..reward.ppo_reward import RewardFn  # noqa: F401 - the one protocol, beside the app's reward functions


def value_head_from_pooled_head(weight: torch.Tensor, bias: float | torch.Tensor, mean: torch.Tensor | None = None,
                                std: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Turn a linear head on pooled features [2H] (last token ++ response mean, standardised by mean/std)
    into a per-token head [H]: the score it gives to a one-token response whose hidden state is h,
        v(h) = sum_k w_k * (h - m_k) / s_k + b   over both halves k.
    Returns (weight [H] float32, bias float).
    """
    w = weight.detach().float().reshape(-1)
    H2 = w.numel()
    if H2 % 2:
        raise ValueError("a pooled head has 2 * hidden_size weights")
    m = torch.zeros(H2) if mean is None else mean.detach().float().reshape(-1).cpu()
    s = torch.ones(H2) if std is None else std.detach().float().reshape(-1).cpu().clamp(min=1e-6)
    w = w.cpu() / s
    H = H2 // 2
    return (w[:H] + w[H:]).contiguous(), float(bias) - float((w * m).sum())


class LinearHeadReward:
    """score = w . (pool_features(base_hidden) - mean) / std + b: a fast-tier style linear reward head.

    weight [2H], bias scalar, mean/std [2H] (optional standardisation of the features).
    """
    uses_base_hidden = True

    def __init__(self, weight: torch.Tensor, bias: float = 0.0, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None):
        self.weight = weight.detach().float().reshape(-1)
        self.bias = float(bias)
        self.mean = None if mean is None else mean.detach().float().reshape(-1)
        self.std = None if std is None else std.detach().float().reshape(-1).clamp(min=1e-6)

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
        x = pool_features(hidden, attention_mask, response_mask)
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.std is not None:
            x = x / self.std.to(x.device)
        return x

    @torch.no_grad()
    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None) -> torch.Tensor:
        if base_hidden is None:
            from ..model_utils import causal_lm_of, position_ids_from_mask
            lm = causal_lm_of(model)
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            with ctx:
                base_hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                               position_ids=position_ids_from_mask(attention_mask),
                                               use_cache=False).last_hidden_state
        x = self.features(base_hidden, attention_mask, response_mask)
        return x @ self.weight.to(x.device) + self.bias

    def value_head_init(self) -> tuple[torch.Tensor, float]:
        return value_head_from_pooled_head(self.weight, self.bias, self.mean, self.std)


class TokenCountReward:
    """score = scale * (number of response tokens in `token_ids`), optionally per response token (rate=True).

    A synthetic reward that needs no forward pass; the GPU bench uses it to check that PPO moves the policy.
    """
    uses_base_hidden = False

    def __init__(self, token_ids, scale: float = 1.0, rate: bool = False):
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.scale = float(scale)
        self.rate = rate

    @torch.no_grad()
    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None) -> torch.Tensor:
        hit = torch.isin(input_ids, self.token_ids.to(input_ids.device)) & response_mask.bool()
        n = hit.sum(1).float()
        if self.rate:
            n = n / response_mask.sum(1).clamp(min=1).float()
        return self.scale * n

