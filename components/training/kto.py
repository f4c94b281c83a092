"""KTO (Ethayarajh et al., 2024): learn from unpaired good/bad labels (thumbs, stars), no pairs needed.

Each row is (prompt x, completion y, desirable?). With r = log pi(y|x) - log pi_ref(y|x) and z the policy's KL
to the reference, estimated on mismatched rows (each prompt with another row's completion) and not
differentiated through, KTO's value function is

    desirable:   v = w_d * sigmoid(beta * (r - z))     undesirable:   v = w_u * sigmoid(beta * (z - r))
    loss = mean over rows of (w - v)      i.e. w_d * (1 - sigmoid(beta (r - z))) and w_u * (1 - sigmoid(beta (z - r)))

The reference is the base with the adapter off (components/training/engine/offline.py). One step:
    1. rows      the next `batch_size` labelled rows of a shuffled pass (s.export("unpaired")'s rows)
    2. policy    one forward over the completions, with gradients
    3. reference one no-grad forward, adapter off, over the rows (those not scored before: `cache_reference`)
                 and the mismatched rows (each prompt with the next row's completion) together
    4. KL        a no-grad policy forward over the mismatched rows; with 3. -> z (clamped at 0)
    5. loss      `kto_loss` below; AdamW on the LoRA parameters
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import OfflineConfig, need
from .engine.offline import OfflineEngine


@dataclass
class KTOConfig(OfflineConfig):
    # batch_size, grad_accum, max_completion_tokens, beta: OfflineConfig (the KL estimate z is taken over each
    # micro-batch)
    desirable_weight: float = 1.0
    """w_d: weight of the desirable rows' losses (raise it where good labels are rarer than bad ones)."""
    undesirable_weight: float = 1.0
    """w_u: weight of the undesirable rows' losses."""
    estimate_kl: bool = True
    """Estimate z from mismatched rows (one more no-grad policy pass a step, and as many rows more in the
    reference pass); False: z = 0 (cheaper, the paper's reference point dropped)."""

    UPPER_BOUNDS: ClassVar[dict] = {**OfflineConfig.UPPER_BOUNDS, "desirable_weight": 1e3, "undesirable_weight": 1e3}

    def check(self) -> None:
        super().check()
        need(self.desirable_weight > 0 and self.undesirable_weight > 0,
             "desirable_weight and undesirable_weight must be > 0")


# ----------------------------------------------------------------------------------------------------------
# The loss (pure)
# ----------------------------------------------------------------------------------------------------------

def kto_kl(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """The reference point z: mean over rows of log pi(y'|x) - log pi_ref(y'|x) on mismatched rows [N],
    clamped at 0 and detached (a scalar)."""
    return (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and implicit rewards.

    policy_logps, ref_logps: [N] summed completion log-probs; desirable: [N] bool; kl: scalar z (kto_kl).
    Returns (losses [N], rewards [N] = beta * (log pi - log pi_ref), detached)."""
    r = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad), (beta * r).detach()


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

class KTOTrainer(OfflineEngine):
    """KTO on `rows` = [{"prompt", "completion", "label"}] (label True = desirable)."""

    algorithm = "kto"
    rows_per_step_key = "samples_per_s"

    def __init__(self, lm, config: KTOConfig, rows: list[dict]):
        super().__init__(lm, config, rows)

    def loss_and_metrics(self, rows: list[dict]) -> tuple[torch.Tensor, dict]:
        cfg, N = self.config, len(rows)
        prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        desirable = torch.tensor([bool(r["label"]) for r in rows], device=self.device)
        b = self.encode(prompts, completions)
        logp, _ = self.sequence_logps(b)
        kl = torch.zeros((), device=self.device)
        if cfg.estimate_kl and N > 1:
            # each prompt with the next row's completion: what the policy says about text it was not asked for;
            # the reference scores the rows and the mismatched rows in one pass (the rows' part may be cached)
            mismatched = completions[1:] + completions[:1]
            both = self.reference_logps(prompts + prompts, completions + mismatched, labelled=N)
            ref = both[:N]
            with torch.no_grad():
                kl = kto_kl(self.sequence_logps(self.encode(prompts, mismatched))[0], both[N:])
        else:
            ref = self.reference_logps(prompts, completions, batch=b)
        losses, rewards = kto_loss(logp, ref, desirable, kl, cfg.beta, cfg.desirable_weight,
                                   cfg.undesirable_weight)
        loss = losses.mean()
        good, bad = desirable, ~desirable
        metrics = {"loss": float(loss.detach()), "kl": float(kl),
                   "reward_desirable": float(rewards[good].mean()) if good.any() else 0.0,
                   "reward_undesirable": float(rewards[bad].mean()) if bad.any() else 0.0,
                   "logp_desirable": float(logp[good].detach().mean()) if good.any() else 0.0,
                   "logp_undesirable": float(logp[bad].detach().mean()) if bad.any() else 0.0}
        return loss, metrics
