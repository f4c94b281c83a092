"""DPO (Rafailov et al., 2023): learn from preference pairs directly, no reward model, no sampling.

For a pair (prompt x, chosen y_w, rejected y_l) the policy's implicit reward of a completion is
beta * (log pi(y|x) - log pi_ref(y|x)); DPO maximises the log-likelihood that the chosen one wins under
Bradley-Terry:

    h      = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    loss   = -log sigmoid(beta * h)                      "sigmoid"  (DPO)
           = (h / n - 1 / (2 beta))^2                     "ipo"      (Azar et al., 2023; per-token mean log-probs)
           = -log sigmoid(beta * (m_w - m_l) - gamma)     "simpo"    (Meng et al., 2024; m = mean token log-prob
                                                                      of the policy alone: no reference pass)

The reference is the base with the adapter off (components/training/engine/offline.py). One step:
    1. rows      the next `batch_size` pairs of a shuffled pass over the studio's compiled pairs
    2. policy    one forward over the 2N completions (chosen and rejected together), with gradients
    3. reference one no-grad forward with the adapter off over the completions not scored before (not for
                 simpo; each completion's sum is kept for the later passes over the data: `cache_reference`)
    4. loss      `dpo_loss` below; AdamW on the LoRA parameters
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import OfflineConfig, need
from .engine.offline import OfflineEngine

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


@dataclass
class DPOConfig(OfflineConfig):
    # batch_size, grad_accum, max_completion_tokens, beta: OfflineConfig (batch_size counts preference pairs)
    loss_type: str = "sigmoid"
    """"sigmoid" (DPO), "ipo" or "simpo" (reference-free; see the module docs). beta is DPO's and IPO's beta,
    SimPO's scale."""
    label_smoothing: float = 0.0
    """Sigmoid loss only: the assumed chance that a label is flipped (conservative DPO); 0 = off."""
    simpo_gamma: float = 0.5
    """SimPO only: gamma, the target reward margin (beta times mean token log-prob) the chosen must win by."""

    UPPER_BOUNDS: ClassVar[dict] = {**OfflineConfig.UPPER_BOUNDS, "simpo_gamma": 100.0}

    def check(self) -> None:
        super().check()
        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}")
        need(0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        need(self.simpo_gamma >= 0, "simpo_gamma must be >= 0")

    def scored_rows(self) -> int:
        return 2 * self.batch_size          # a pair's two completions are scored together


# ----------------------------------------------------------------------------------------------------------
# The loss (pure)
# ----------------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards.

    policy_* / ref_*: [N] summed log-probs of each completion under the policy / the reference (ref unused by
    simpo); *_tokens: [N] completion lengths (ipo and simpo average over tokens).
    Returns (losses [N], chosen_rewards [N], rejected_rewards [N]); rewards = beta * (log pi - log pi_ref)
    (simpo: beta * mean token log-prob), detached, for the curves.
    """
    if loss_type in ("ipo", "simpo"):
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"{loss_type} needs the completions' token counts")
        nc, nr = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    if loss_type == "simpo":
        mc, mr = policy_chosen / nc, policy_rejected / nr
        losses = -F.logsigmoid(beta * (mc - mr) - simpo_gamma)
        return losses, (beta * mc).detach(), (beta * mr).detach()
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        h = chosen_ratio / nc - rejected_ratio / nr
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

class DPOTrainer(OfflineEngine):
    """DPO on `rows` = [{"prompt", "chosen", "rejected"}] (the studio's compiled pairs)."""

    algorithm = "dpo"

    def __init__(self, lm, config: DPOConfig, rows: list[dict]):
        super().__init__(lm, config, rows)

    def loss_and_metrics(self, rows: list[dict]) -> tuple[torch.Tensor, dict]:
        cfg, N = self.config, len(rows)
        prompts = [r["prompt"] for r in rows]
        # chosen and rejected in one batch: rows 0..N-1 chosen, N..2N-1 rejected (one pass, one shared prefix)
        completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        b = self.encode(prompts + prompts, completions)
        logp, n_tok = self.sequence_logps(b)
        if cfg.loss_type == "simpo":
            ref = torch.zeros_like(logp)
        else:
            ref = self.reference_logps(prompts + prompts, completions, batch=b)
        losses, chosen_r, rejected_r = dpo_loss(logp[:N], logp[N:], ref[:N], ref[N:], cfg.beta, cfg.loss_type,
                                                cfg.label_smoothing, n_tok[:N], n_tok[N:], cfg.simpo_gamma)
        loss = losses.mean()
        metrics = {"loss": float(loss.detach()), "reward_chosen": float(chosen_r.mean()),
                   "reward_rejected": float(rejected_r.mean()),
                   "reward_margin": float((chosen_r - rejected_r).mean()),
                   "reward_accuracy": float((chosen_r > rejected_r).float().mean()),
                   "logp_chosen": float(logp[:N].detach().mean()), "logp_rejected": float(logp[N:].detach().mean())}
        return loss, metrics
