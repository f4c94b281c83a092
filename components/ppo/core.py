"""PPO maths as pure functions on tensors (no model, no state except the KL controllers).

Shapes: B = sequences in the batch, T = response tokens (responses are right-padded to T), V = vocabulary.
`mask` / `response_mask` is 1.0 on real response tokens (up to and including the first EOS) and 0.0 after.
Reference: "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) and TRL's PPO trainer.
"""
from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ----------------------------------------------------------------------------------------------------------

def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label) under softmax(logits / temperature).

    logits: [B, T, V] (any float dtype; computed in float32), labels: [B, T] int64 -> [B, T] float32.
    Uses gather - logsumexp, so no [B, T, V] log-softmax tensor is kept beyond the float32 logits themselves.
    The temperature must be the sampling temperature: the rollout sampled from softmax(logits / temperature).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: [B, T, V] -> [B, T] float32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v   (z = logits / temperature).
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    return lse - (torch.softmax(z, dim=-1) * z).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked entries (unbiased: Bessel's correction n / (n - 1), as TRL)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; shift_mean=False keeps the mean (scales only).

    Entries outside the mask are returned as computed (callers multiply by the mask where it matters).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ----------------------------------------------------------------------------------------------------------
# Rewards: sequence score + per-token KL penalty
# ----------------------------------------------------------------------------------------------------------

def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded response mask [B, T] -> [B] (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         response_mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * (logp_t - ref_logp_t), plus the sequence score at the last response token.

    scores: [B]; logp, ref_logp, response_mask: [B, T].
    Returns (rewards [B, T], kl [B, T]) with both zero outside the mask. kl is the k1 estimator logp - ref_logp;
    its row sums are the sequence-level KL estimates that the adaptive controller and the metrics use.
    """
    mask = response_mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = last_token_index(response_mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards * mask, kl


# ----------------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over response tokens (Schulman et al. 2016).

    rewards, values, mask: [B, T] (right-padded; values after the last real token are treated as 0, i.e. the
    episode ends at the last response token). Returns (advantages [B, T], returns [B, T] = advantages + values),
    zero outside the mask.
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


# ----------------------------------------------------------------------------------------------------------
# Clipped losses
# ----------------------------------------------------------------------------------------------------------

LOG_RATIO_MAX = 20.0


def policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, token-level mean over the mask.

    All inputs [B, T]. ratio = exp(min(new - old, LOG_RATIO_MAX));
        loss     = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
        clip_frac= mean(1[-A * clip(ratio) > -A * ratio])        (fraction of tokens where the clip is active)
        approx_kl= mean(0.5 * (new - old)^2)                     (k2 estimator of KL(old || new))
    Returns (loss, clip_frac, approx_kl) as 0-d tensors; only loss carries a gradient.
    """
    log_ratio = new_logp - old_logp
    # exp overflows float32 past ~88, and one inf, even on a masked token (inf * 0 = nan), makes the loss NaN.
    # Above LOG_RATIO_MAX (a token 5e8 times likelier than when sampled) the term is held constant instead.
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clip_frac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio.float() ** 2, mask)
    return loss, clip_frac, approx_kl


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, token-level mean over the mask.

    All inputs [B, T]. v_clip = old + clip(new - old, -eps_v, eps_v);
        loss      = 0.5 * mean(max((new - R)^2, (v_clip - R)^2))
        clip_frac = mean(1[(v_clip - R)^2 > (new - R)^2])
    Returns (loss, clip_frac).
    """
    v_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf1 = (new_values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    with torch.no_grad():
        clip_frac = masked_mean((vf2 > vf1).float(), mask)
    return loss, clip_frac


# ----------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# ----------------------------------------------------------------------------------------------------------

class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019):

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    `current_kl` is the batch mean of the sequence-level KL; `n_steps` the number of samples in the batch.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = int(d.get("horizon", self.horizon))
