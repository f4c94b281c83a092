"""What RLOO and GRPO share: k completions of each prompt sampled and scored by PPO's engine, no value head.

The engine (components/ppo/trainer.py: `PPOTrainer.collect` samples with the fast sampler, runs the policy and
reference passes and scores with the reward model; `_optimise` runs epochs x shuffled mini-batches x micro-batches
with compiled / fused / packed passes and the gradient clip) is reused as is. An online algorithm only says how a
group's rewards become advantages and what loss a micro-batch minimises:

    prompts  [P] -> each repeated k times, contiguous: rows g*k .. g*k+k-1 are prompt g's group
    scores   [P*k]  reward model at the last token, minus `missing_eos_penalty` without EOS
    seq_kl   [P*k]  sum over response tokens of log pi_old - log pi_ref
    advantages [P*k] -> the algorithm's `advantages()`; its `loss()` per micro-batch
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..ppo.config import PPOConfig
from ..ppo.rollout import forward_response
from ..ppo.trainer import PPOTrainer
from .config import TrainConfig, need


@dataclass
class OnlineConfig(TrainConfig):
    # ---- batch shape --------------------------------------------------------------------------------------
    prompts_per_step: int = 4
    """Prompts sampled per step."""
    k: int = 4
    """Completions sampled per prompt (the group); at least 2, the baseline comes from the others."""
    mini_batch_size: int = 16
    """Completions per optimiser step; prompts_per_step * k must be a multiple of it."""
    grad_accum: int = 1
    """Micro-batches per mini-batch (memory knob, same math); mini_batch_size must be a multiple of it."""
    epochs: int = 1
    """Passes over each step's completions; with more than one the ratio to the sampling policy is clipped."""

    # ---- sampling -----------------------------------------------------------------------------------------
    max_new_tokens: int = 48
    """Response length limit; responses that reach it without EOS get `missing_eos_penalty`."""
    temperature: float = 0.9
    """Sampling temperature (k samples of a prompt must differ for the group to teach anything)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = off."""

    # ---- reward and KL ------------------------------------------------------------------------------------
    kl_coef: float = 0.05
    """beta: weight of the KL to the reference (where it enters is the algorithm's: see its module)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of responses that end without EOS."""
    score_clip: float = 0.0
    """Clip reward-model scores to [-score_clip, score_clip]; 0 = off."""
    cliprange: float = 0.2
    """Clip epsilon of the ratio to the sampling policy (matters only from the second epoch or mini-batch on)."""

    # ---- engine -------------------------------------------------------------------------------------------
    compile: str = "off"
    """torch.compile the training passes' decoder layers: "on", "off" or "auto" (PPOConfig.compile)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower)."""
    n_display_samples: int = 4
    """(prompt, response, reward) triples in each step's metrics, for display."""

    UPPER_BOUNDS = {**TrainConfig.UPPER_BOUNDS, "prompts_per_step": 4096, "k": 256, "mini_batch_size": 4096,
                    "grad_accum": 4096, "epochs": 100, "max_new_tokens": 8192, "temperature": 10.0,
                    "kl_coef": 100.0, "missing_eos_penalty": 1e4, "score_clip": 1e6, "cliprange": 10.0,
                    "n_display_samples": 4096}

    def check(self) -> None:
        n = self.prompts_per_step * self.k
        need(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        need(self.k >= 2, "k must be >= 2: each completion's baseline comes from the other completions of its prompt")
        need(self.mini_batch_size >= 1 and n % self.mini_batch_size == 0,
             f"prompts_per_step * k ({n}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        need(self.grad_accum >= 1 and self.mini_batch_size % self.grad_accum == 0,
             f"mini_batch_size ({self.mini_batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        need(self.epochs >= 1 and self.max_new_tokens >= 1, "epochs and max_new_tokens must be >= 1")
        need(self.temperature > 0 and 0 < self.top_p <= 1, "temperature must be > 0 and top_p in (0, 1]")
        need(self.kl_coef >= 0 and self.missing_eos_penalty >= 0 and self.score_clip >= 0,
             "kl_coef, missing_eos_penalty and score_clip must be >= 0")
        need(self.cliprange > 0, "cliprange must be > 0")
        need(self.compile in ("auto", "on", "off"), "compile must be auto, on or off")
        need(not (self.compile == "on" and self.gradient_checkpointing),
             "compile and gradient_checkpointing cannot be combined; turn one off")
        need(self.n_display_samples >= 0, "n_display_samples must be >= 0")

    def engine_config(self) -> PPOConfig:
        return PPOConfig(steps=self.steps, batch_size=self.prompts_per_step * self.k,
                         mini_batch_size=self.mini_batch_size, grad_accum=self.grad_accum, ppo_epochs=self.epochs,
                         max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                         kl_coef=self.kl_coef, missing_eos_penalty=self.missing_eos_penalty,
                         score_clip=self.score_clip, cliprange=self.cliprange, vf_coef=0.0, value_head_init="zeros",
                         compile=self.compile, gradient_checkpointing=self.gradient_checkpointing,
                         checkpoint_every=self.checkpoint_every, n_display_samples=self.n_display_samples,
                         **self._shared_engine_fields())


def groups_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """[P*k] (groups contiguous) -> [P, k]."""
    if x.numel() % k:
        raise ValueError(f"{x.numel()} values do not split into groups of {k}")
    return x.view(-1, k)


class OnlineTrainer(PPOTrainer):
    """PPO's engine with the value head left out of the update; subclasses give `advantages` and `loss`."""

    algorithm = ""
    LOSS_STATS = ("policy_loss", "clip_frac", "kl_term")

    def __init__(self, lm, reward_fn, config: OnlineConfig, prompts: list):
        config.validate()
        self.algo_config = config
        super().__init__(lm, reward_fn, config.engine_config(), prompts)
        # no critic: only the LoRA parameters are trained (the engine's value head stays at zero, unused)
        self._params = list(self._lora)
        self.optimizer = torch.optim.AdamW(self._params, lr=self.config.lr, eps=self.config.adam_eps,
                                           weight_decay=self.config.weight_decay,
                                           fused=self.device.type == "cuda" or None)

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
        out = []
        for _ in range(self.algo_config.prompts_per_step):
            if self._pos >= len(self._perm):
                self._perm = torch.randperm(len(self.prompts), generator=self._gen)
                self._pos = 0
            out += [self.prompts[int(self._perm[self._pos])]] * self.algo_config.k
            self._pos += 1
        return out

    def _micro_step(self, ro, idx, cols, advantages, ref_logp, mask, sums, prompt_lengths=None) -> None:
        """The engine's micro-batch (see PPOTrainer._micro_step); here its `returns` slot carries the reference
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
            self._activate_policy()
            self.model.eval()
            prompts = self._next_prompts()
            # ---- 1. sample k completions a prompt, policy and reference passes, scores (the engine) -------------
            ro, ref_logp, raw_scores, scores, (t_start, t_gen, t_pol, t_ref) = self.collect(prompts)
            mask = ro.response_mask.float()
            seq_kl = ((ro.old_logp - ref_logp) * mask).sum(1)
            # ---- 2. advantages from each group's rewards (the algorithm) ---------------------------------------
            adv, adv_metrics = self.advantages(scores, seq_kl)
            t_score = time.perf_counter()
            # ---- 3. optimise: epochs x shuffled mini-batches x micro-batches (the engine, the algorithm's loss) -
            lr = self._current_lr()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
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
                "t_step": total, "samples_per_s": cfg.batch_size / max(total, 1e-9),
                "samples": self._display(ro, scores),
            }
