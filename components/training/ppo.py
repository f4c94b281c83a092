"""PPO (Schulman et al., 2017) for RLHF, as in "The N Implementation Details of RLHF with PPO" (Huang et al., 2024).

Read top to bottom: the math as pure functions on tensors (rewards with the KL penalty, GAE, the clipped policy
and value losses, the KL coefficient's controllers), then `PPOTrainer`: its set-up (value head, KL controller),
`step()` (one PPO iteration) and `_micro_step()` (the loss of one micro-batch). Sampling, the policy and
reference passes, scoring and the mini-batch loop are the engine's (components/training/engine/online.py), as are
evaluation, checkpoints and export (engine/evaluation.py, checkpoint.py).

One `step()`:
    1. rollout       sample one response per prompt (the engine's `collect`)
    2. policy pass   old log-probs (at temperature T) + values + entropy
    3. reference     ref log-probs (+ base hidden states for the reward), adapters off
    4. reward        score at the last response token; -missing_eos_penalty when no EOS; per-token -beta*KL
    5. GAE           advantages and returns; advantages whitened over the batch
    6. optimise      ppo_epochs x shuffled minibatches (x grad_accum micro-batches): clipped policy loss
                     + vf_coef * clipped value loss - ent_coef * entropy; grad-norm clip; AdamW on LoRA + head

Shapes: B = sequences in the batch, T = response tokens (responses are right-padded to T), V = vocabulary.
`mask` / `response_mask` is 1.0 on real response tokens (up to and including the first EOS) and 0.0 after.
"""
from __future__ import annotations

import math
import time

import torch

from .engine.online import OnlineEngine
from .engine.ops import masked_mean, masked_whiten
from .engine.rollout import Rollout, forward_response
from .engine.value_head import init_value_head
from .ppo_config import PPOConfig


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


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

class PPOTrainer(OnlineEngine):
    """PPO with a LoRA policy and a value head on its trunk, on `lm` (a components.models.LoadedModel).

    reward_fn: the RewardFn protocol (components/training/rewards.py); prompts: the training prompts (text, or
    lists of token ids). `step()` runs one PPO iteration and returns its metrics; `train()` loops with a stop check.
    """

    algorithm = "ppo"
    LOSS_STATS = ("policy_loss", "value_loss", "clip_frac", "approx_kl", "vf_clip_frac")
    trains_value_head = True

    def __init__(self, lm, reward_fn, config: PPOConfig | None = None, prompts: list | None = None,
                 device=None):
        super().__init__(lm, reward_fn, config or PPOConfig(), prompts, device)
        cfg = self.config
        self.value_head_source = init_value_head(self.value_head, reward_fn, cfg.value_head_init == "reward")
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))

    def _algorithm_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def _load_algorithm_state(self, meta: dict) -> None:
        self.kl_ctl.load_state_dict(meta["kl_ctl"])

    def step(self) -> dict:
        cfg = self.config
        with self.lm.lock:
            # ---- 1-3. rollout, policy pass, reference pass (the engine's `collect`) -------------------------
            ro, ref_logp, raw_scores, scores, (t_start, t_gen, t_pol, t_ref) = self.collect_next()
            rmask, has_eos = ro.response_mask, ro.has_eos

            # ---- 4. reward: the score at the last token (`collect`), per-token KL penalty -----------------
            mask = rmask.float()
            beta = self.kl_ctl.value
            rewards, kl = kl_penalized_rewards(scores, ro.old_logp, ref_logp, mask, beta)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
            t_score = time.perf_counter()

            # ---- 5. advantages: GAE, then whitened over the batch ------------------------------------------
            values = ro.values * mask
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask) * mask

            # ---- 6. optimise: ppo_epochs x shuffled minibatches x grad_accum micro-batches ------------------
            lr = self._set_lr()
            stats = self._optimise(ro, advantages, returns, mask)
            t_train = time.perf_counter()

            # ---- 7. KL controller, bookkeeping, metrics ------------------------------------------------------
            seq_kl = kl.sum(1)
            self.kl_ctl.update(float(seq_kl.mean()), cfg.batch_size)
            self.step_count += 1
            n_tok = mask.sum().clamp(min=1)
            total = t_train - t_start
            metrics = {
                "step": self.step_count,
                "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
                "score_mean": float(raw_scores.mean()),
                "rlhf_reward": float((scores - beta * seq_kl).mean()),
                "kl": float(seq_kl.mean()),
                "kl_coef": float(beta),
                "entropy": float((ro.entropy * mask).sum() / n_tok),
                "value_mean": float((values.sum() / n_tok)),
                "return_mean": float((returns.sum() / n_tok)),
                **stats,
                "response_len": float(mask.sum(1).mean()),
                "eos_frac": float(has_eos.float().mean()),
                "lr": lr,
                "compiled": float(self.compiled),
                "t_generate": t_gen - t_start,
                "t_policy": t_pol - t_gen,
                "t_reference": t_ref - t_pol,
                "t_score": t_score - t_ref,
                "t_train": t_train - t_score,
                "t_step": total,
                "samples_per_s": cfg.batch_size / max(total, 1e-9),
                "samples": self._display(ro, scores),
            }
        return metrics

    def _micro_step(self, ro: Rollout, idx: torch.Tensor, cols: tuple[int, int], advantages, returns, mask,
                    sums: dict, prompt_lengths: list[int] | None = None) -> None:
        """Forward and backward of the clipped PPO loss on rows `idx`; adds its statistics to `sums`. cols: (first
        prompt column, response length) that hold a token in some row: the columns outside are trimmed.
        prompt_lengths: those rows' prompt lengths, on the host (packing then reads nothing back)."""
        cfg = self.config
        first, R = cols
        q, qm = ro.query_ids[idx, first:], ro.query_mask[idx, first:]
        r, rm = ro.response_ids[idx, :R], ro.response_mask[idx, :R]
        m = mask[idx, :R]
        fo = forward_response(self.model, q, qm, r, rm, cfg.temperature, value_head=self.value_head,
                              want_entropy=cfg.ent_coef > 0, entropy_grad=cfg.ent_coef > 0,
                              share_prefix=self._share_prefix_in_training, pack=self.pack_rows,
                              prompt_lengths=prompt_lengths, logprobs_fn=self._logprobs_fn)
        pl, cf, akl = policy_loss(fo.logp, ro.old_logp[idx, :R], advantages[idx, :R], m, cfg.cliprange)
        vl, vcf = value_loss(fo.values, ro.values[idx, :R], returns[idx, :R], m, cfg.cliprange_value)
        loss = pl + cfg.vf_coef * vl
        if cfg.ent_coef > 0:
            loss = loss - cfg.ent_coef * masked_mean(fo.entropy, m)
        (loss / cfg.grad_accum).backward()
        # kept on the device: a float() here would wait for the GPU five times per micro-batch
        sums["policy_loss"] += pl.detach()
        sums["value_loss"] += vl.detach()
        sums["clip_frac"] += cf.detach()
        sums["approx_kl"] += akl.detach()
        sums["vf_clip_frac"] += vcf.detach()
