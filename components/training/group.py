"""What RLOO and GRPO share: k completions of each prompt sampled and scored by the online engine, no value head.

The engine (components/training/engine/online.py: `collect` samples with the fast sampler, runs the policy and
reference passes and scores with the reward model; `_optimise` runs epochs x shuffled mini-batches x
micro-batches with compiled / fused / packed passes and the gradient clip) is reused as is, reading its settings
from the group's config (an OnlineConfig). A group algorithm only says how a group's rewards become advantages
and what loss a micro-batch minimises:

    prompts  [P] -> each repeated k times, contiguous: rows g*k .. g*k+k-1 are prompt g's group
    scores   [P*k]  reward model at the last token, minus `missing_eos_penalty` without EOS
    seq_kl   [P*k]  sum over response tokens of log pi_old - log pi_ref
    advantages [P*k] -> the algorithm's `advantages()`; its `loss()` per micro-batch
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import OnlineConfig, need
from .engine.online import OnlineEngine
from .engine.rollout import forward_response


@dataclass
class GroupConfig(OnlineConfig):
    # ---- batch shape (mini_batch_size, grad_accum: OnlineConfig) --------------------------------------------
    prompts_per_step: int = 4
    """Prompts sampled per step."""
    k: int = 4
    """Completions sampled per prompt (the group); at least 2, the baseline comes from the others."""
    mini_batch_size: int = 16
    """Completions per optimiser step; prompts_per_step * k must be a multiple of it."""
    epochs: int = 1
    """Passes over each step's completions; with more than one the ratio to the sampling policy is clipped."""

    # ---- sampling and reward (the others: OnlineConfig) ---------------------------------------------------
    temperature: float = 0.9
    """Sampling temperature (k samples of a prompt must differ for the group to teach anything)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of responses that end without EOS."""

    UPPER_BOUNDS: ClassVar[dict] = {**OnlineConfig.UPPER_BOUNDS, "prompts_per_step": 4096, "k": 256, "epochs": 100}

    def check(self) -> None:
        n = self.prompts_per_step * self.k
        need(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        need(self.k >= 2, "k must be >= 2: each completion's baseline comes from the other completions of its prompt")
        need(self.mini_batch_size >= 1 and n % self.mini_batch_size == 0,
             f"prompts_per_step * k ({n}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        need(self.epochs >= 1, "epochs must be >= 1")
        super().check()

    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.k

    def epochs_per_step(self) -> int:
        return self.epochs


def groups_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """[P*k] (groups contiguous) -> [P, k]."""
    if x.numel() % k:
        raise ValueError(f"{x.numel()} values do not split into groups of {k}")
    return x.view(-1, k)


class GroupTrainer(OnlineEngine):
    """The online engine with no critic (only the LoRA parameters are trained; the engine's value head stays at
    zero, unused); subclasses give `advantages` and `loss`."""

    LOSS_STATS = ("policy_loss", "clip_frac", "kl_term")

    def _checkpoint_config(self) -> dict:
        # a stored format: the checkpoints of RLOO and GRPO runs hold their settings in the PPOConfig form that
        # versions before the online engine had its own config wrote (only its LoRA shape is read back)
        return self.config.engine_config().to_dict()

    # ---- the algorithm (subclasses) ---------------------------------------------------------------------------
    def advantages(self, scores: torch.Tensor, seq_kl: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """scores [P*k], seq_kl [P*k] -> (advantages [P*k], metrics)."""
        raise NotImplementedError

    def loss(self, logp, old_logp, ref_logp, advantages, mask) -> tuple[torch.Tensor, dict]:
        """One micro-batch: logp, old_logp, ref_logp, mask [N, R]; advantages [N] -> (loss, {LOSS_STATS})."""
        raise NotImplementedError

    # ---- the engine's hooks -------------------------------------------------------------------------------------
    def _next_prompts(self) -> list:
        """The next prompts_per_step prompts of a shuffled pass, each repeated k times (groups contiguous)."""
        k = self.config.k
        return [p for i in self.order.take(self.config.prompts_per_step) for p in [self.prompts[i]] * k]

    def _micro_step(self, ro, idx, cols, advantages, ref_logp, mask, sums, prompt_lengths=None) -> None:
        """The engine's micro-batch (as PPOTrainer._micro_step); here its `returns` slot carries the reference
        log-probs and `advantages` is [B, R] with each row's advantage in every column."""
        first, R = cols
        fo = forward_response(self.model, ro.query_ids[idx, first:], ro.query_mask[idx, first:],
                              ro.response_ids[idx, :R], ro.response_mask[idx, :R], self.config.temperature,
                              share_prefix=self._share_prefix_in_training, pack=self.pack_rows,
                              prompt_lengths=prompt_lengths, logprobs_fn=self._logprobs_fn)
        loss, stats = self.loss(fo.logp, ro.old_logp[idx, :R], ref_logp[idx, :R], advantages[idx, 0],
                                mask[idx, :R])
        (loss / self.config.grad_accum).backward()
        for k in self.LOSS_STATS:
            sums[k] += stats[k].detach()

    # ---- one step ---------------------------------------------------------------------------------------------
    def step(self) -> dict:
        cfg = self.config
        with self.lm.lock:
            # ---- 1. sample k completions a prompt, policy and reference passes, scores (the engine) -------------
            ro, ref_logp, raw_scores, scores, (t_start, t_gen, t_pol, t_ref) = self.collect_next()
            mask = ro.response_mask.float()
            seq_kl = ((ro.old_logp - ref_logp) * mask).sum(1)
            # ---- 2. advantages from each group's rewards (the algorithm) ---------------------------------------
            adv, adv_metrics = self.advantages(scores, seq_kl)
            t_score = time.perf_counter()
            # ---- 3. optimise: epochs x shuffled mini-batches x micro-batches (the engine, the algorithm's loss) -
            lr = self._set_lr()
            stats = self._optimise(ro, adv[:, None].expand_as(mask).contiguous(), ref_logp, mask)
            t_train = time.perf_counter()
            self.step_count += 1
            total = t_train - t_start
            n_tok = mask.sum().clamp(min=1)
            return {
                "step": self.step_count, "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
                "score_mean": float(raw_scores.mean()), "kl": float(seq_kl.mean()),
                "entropy": float((ro.entropy * mask).sum() / n_tok), **adv_metrics, **stats,
                "response_len": float(mask.sum(1).mean()), "eos_frac": float(ro.has_eos.float().mean()),
                "lr": lr, "compiled": float(self.compiled), "t_generate": t_gen - t_start, "t_policy": t_pol - t_gen,
                "t_reference": t_ref - t_pol, "t_score": t_score - t_ref, "t_train": t_train - t_score,
                "t_step": total, "samples_per_s": cfg.samples_per_step() / max(total, 1e-9),
                "samples": self._display(ro, scores),
            }
