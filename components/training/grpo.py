"""GRPO (Shao et al., 2024, DeepSeekMath): PPO's clipped objective with a group baseline instead of a critic.

Each prompt gets k completions; a completion's advantage is its score normalised within its group, the same for
all its tokens, and the KL to the reference is a term of the loss (not a reward penalty), estimated per token
with the unbiased, always-positive k3 estimator:

    A_i      = (s_i - mean_g s) / (std_g s + 1e-4)           (scale_rewards=False: without the division)
    rho_t    = pi(y_t) / pi_old(y_t)
    KL_t     = pi_ref(y_t) / pi(y_t) - log(pi_ref(y_t) / pi(y_t)) - 1
    loss     = mean_i  1/|y_i| sum_t -( min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta KL_t )

One step = the engine's rollout of P*k completions (components/training/group.py), the advantages below, then
`epochs` passes of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .group import GroupConfig, GroupTrainer, groups_of


@dataclass
class GRPOConfig(GroupConfig):
    kl_coef: float = 0.04
    """beta: weight of the per-token KL to the reference in the loss (the paper's 0.04)."""
    scale_rewards: bool = True
    """Divide each group's centred scores by their standard deviation (the paper); False keeps the raw spread
    (Dr. GRPO, Liu et al., 2025: no bias towards groups whose scores barely differ)."""


# ----------------------------------------------------------------------------------------------------------
# Advantages and loss (pure)
# ----------------------------------------------------------------------------------------------------------

def grpo_advantages(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages: scores [P*k] (groups contiguous) -> [P*k]; std is the unbiased one."""
    s = groups_of(scores, k)
    centred = s - s.mean(1, keepdim=True)
    if scale:
        centred = centred / (s.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, cliprange: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp, old_logp, ref_logp, mask: [N, R]; advantages: [N].
    Returns (loss, fraction of tokens clipped, mean per-token KL)."""
    a = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - cliprange, 1 + cliprange) * a)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_token = -(surrogate - beta * kl)
    n = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / n).mean()
    clipped = ((ratio * a > ratio.clamp(1 - cliprange, 1 + cliprange) * a).float() * mask).sum() / mask.sum()
    return loss, clipped, ((kl * mask).sum() / mask.sum()).detach()


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

class GRPOTrainer(GroupTrainer):
    algorithm = "grpo"

    def advantages(self, scores, seq_kl):
        adv = grpo_advantages(scores, self.config.k, self.config.scale_rewards)
        return adv, {"advantage_std": float(adv.std())}

    def loss(self, logp, old_logp, ref_logp, advantages, mask):
        cfg = self.config
        pl, clip_frac, kl = grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg.cliprange, cfg.kl_coef)
        return pl, {"policy_loss": pl, "clip_frac": clip_frac, "kl_term": kl}
