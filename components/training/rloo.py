"""RLOO (Ahmadian et al., 2024, "Back to Basics"; Kool et al., 2019): REINFORCE with a leave-one-out baseline.

Each prompt gets k completions. A completion's reward is the reward model's score with the KL to the reference
as a penalty (RLOO puts the KL in the reward, as PPO does), and its baseline is the mean reward of the other
k - 1 completions of the same prompt, so no value head is needed:

    r_i   = score_i - beta * KL_i                  KL_i = sum_t log pi_old(y_t) - log pi_ref(y_t)
    A_i   = r_i - (sum_j r_j - r_i) / (k - 1)      (j over the group of i)
    loss  = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps))     rho_i = pi(y_i) / pi_old(y_i)

rho is the whole completion's probability ratio; on the first pass it is 1 and the gradient is REINFORCE's,
-A_i * grad log pi(y_i). One step = the engine's rollout of P*k completions (components/training/group.py), the
advantages below, then `epochs` passes of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .group import GroupConfig, GroupTrainer, groups_of


@dataclass
class RLOOConfig(GroupConfig):
    normalize_advantages: bool = False
    """Whiten the advantages over the step's batch (mean 0, std 1) before the loss; off in the paper."""


# ----------------------------------------------------------------------------------------------------------
# Advantages and loss (pure)
# ----------------------------------------------------------------------------------------------------------

def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages: rewards [P*k] (groups contiguous) -> [P*k], each minus the mean of the others
    in its group."""
    r = groups_of(rewards, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def rloo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped REINFORCE on whole completions.

    logp, old_logp, mask: [N, R] per-token log-probs under the policy / at sampling time; advantages: [N].
    Returns (loss, fraction of completions whose ratio was clipped)."""
    log_ratio = ((logp - old_logp) * mask).sum(1)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped).mean(), (clipped > unclipped).float().mean()


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

class RLOOTrainer(GroupTrainer):
    algorithm = "rloo"

    def advantages(self, scores, seq_kl):
        cfg = self.config
        rewards = scores - cfg.kl_coef * seq_kl
        adv = rloo_advantages(rewards, cfg.k)
        if cfg.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return adv, {"rlhf_reward": float(rewards.mean()), "advantage_std": float(adv.std())}

    def loss(self, logp, old_logp, ref_logp, advantages, mask):
        pl, clip_frac = rloo_loss(logp, old_logp, advantages, mask, self.config.cliprange)
        # the KL is in the reward; reported here for the curves only
        kl = ((logp.detach() - ref_logp) * mask).sum(1).mean()
        return pl, {"policy_loss": pl, "clip_frac": clip_frac, "kl_term": kl}
