"""The online engine: sample from the LoRA policy, score, and update it in mini-batches, as fast as the math allows.

One base model serves four roles:
    policy     = base + LoRA adapter `config.adapter_name` (peft; other adapters on `lm.model` are kept)
    reference  = the same base with adapters disabled (`with model.disable_adapter():`)
    value      = a linear head on the policy's final hidden states (engine/value_head.py; only PPO trains it)
    reward     = `reward_fn` (components/training/rewards.py); when `reward_fn.uses_base_hidden`, it reads the
                 base's hidden states from the reference pass, so scoring costs no extra forward.

What the engine does for an algorithm (components/training/ppo.py, rloo.py, grpo.py), in this module:
    collect      1. rollout: sample one response per prompt (dropout off, temperature T, stop at EOS)
                 2. policy pass: old log-probs (at temperature T) + values + entropy, from the final hidden
                    states recorded while sampling (fp32) or one no-grad forward (bf16, 4/8-bit)
                 3. reference pass: ref log-probs (+ base hidden states for the reward), adapters off
                 4. scores at the last response token, -missing_eos_penalty where no EOS, clipped
    _optimise    epochs x shuffled mini-batches x grad_accum micro-batches of the algorithm's `_micro_step`,
                 through the fused LoRA / compiled / packed passes; grad-norm clip; AdamW
    train        steps until done or stopped, with checkpoints
and in its neighbours: which shortcuts the passes take (passes.py), generate_samples and probe (evaluation.py),
state_bytes / load_state_bytes, adapter_bytes and save_adapter (checkpoint.py).

After training the adapter stays on `lm.model` under `config.adapter_name`: generate with it through
`generate_with_adapter(lm, prompts, adapter_name)` (engine/adapter.py).
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from typing import Callable

import torch

from ...attention import avoid_cudnn_attention
from ...fastgen import quantized_base
from ...model_utils import causal_lm_of
from ..config import OnlineConfig
from .acceleration import compile_failure
from .adapter import PolicyAdapter
from .checkpoint import OnlineCheckpoint, ShuffledPass
from .evaluation import Evaluation
from .passes import AcceleratedPasses
from .rollout import Rollout, encode_prompts, forward_response, heads_on_hidden, left_pad, mask_after_eos, \
    output_softcap, sample
from .value_head import init_value_head, new_value_head


class OnlineEngine(PolicyAdapter, AcceleratedPasses, Evaluation, OnlineCheckpoint):
    """What every online algorithm runs on `lm` (a components.models.LoadedModel): the LoRA policy, sampling,
    the policy and reference passes, scoring (`collect`), the update loop (`_optimise`: epochs x shuffled
    mini-batches x micro-batches, with the compiled / fused / packed passes); evaluation, checkpoints and export
    come with it from its neighbouring modules.

    reward_fn: the RewardFn protocol (components/training/rewards.py); prompts: the training prompts (text, or
    lists of token ids); config: the algorithm's config, an OnlineConfig (components/training/config.py), whose
    fields and `samples_per_step()` / `epochs_per_step()` are the engine's settings.
    An algorithm subclasses it with `step()`, `_micro_step()` (the loss of one micro-batch) and `LOSS_STATS`.
    """

    algorithm = ""
    # the statistics `_micro_step` adds up (averaged over micro-batches in each step's metrics)
    LOSS_STATS: tuple[str, ...] = ()
    # whether the update trains the value head (PPO's critic) besides the adapter
    trains_value_head = False

    def __init__(self, lm, reward_fn, config: OnlineConfig, prompts: list | None = None, device=None):
        self.lm = lm
        self.reward_fn = reward_fn
        self.config = config
        self.config.validate()
        if not prompts:
            raise ValueError(f"{self.algorithm.upper() or 'training'} needs at least one training prompt")
        self.prompts = list(prompts)
        self.device = torch.device(device) if device is not None else torch.device(lm.device)
        avoid_cudnn_attention(self.device)
        if lm.eos_token_id == lm.pad_token_id:
            raise ValueError("the tokenizer's pad token equals EOS; load the model with components.models")
        cfg = self.config

        # ---- seeds: LoRA init, sampling (global RNG, used by generate) and our own order/shuffle generator --
        torch.manual_seed(cfg.seed)
        self._gen = torch.Generator().manual_seed(cfg.seed)

        with lm.lock:
            # ---- policy = LoRA adapter on the shared base --------------------------------------------------
            self._attach_policy(lm, cfg)
            if cfg.gradient_checkpointing:
                causal_lm_of(self.model).gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            base_dtype = next(p for p in causal_lm_of(self.model).parameters() if not p.requires_grad).dtype
            quantized = bool(getattr(lm, "quantization", None)) or quantized_base(self.model)
            self._set_up_passes(quantized, base_dtype)      # engine/passes.py
            # ---- value head on the policy trunk, at zero (engine/value_head.py; PPO starts it from the reward) --
            self.value_head = new_value_head(self.model, self.device)
            self.value_head_source = init_value_head(self.value_head, reward_fn, from_reward=False)

        # ---- optimiser: the LoRA parameters (+ the value head where the algorithm trains it) ------------
        self._params = self._lora + (list(self.value_head.parameters()) if self.trains_value_head else [])
        # fused on CUDA: one kernel for all tensors (the foreach step launched ~8 ms of kernels per update at
        # 1.7B, r=16, in an H100 profile); the CPU keeps the default implementation
        self.optimizer = torch.optim.AdamW(self._params, lr=cfg.lr, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, fused=self.device.type == "cuda" or None)

        self.step_count = 0
        self.order = ShuffledPass(len(self.prompts), self._gen, "prompts.perm", "prompt_pos", "n_prompts")

    # ------------------------------------------------------------------------------------------------------
    # A step's prompts and learning rate
    # ------------------------------------------------------------------------------------------------------

    def _next_prompts(self) -> list:
        """The next `samples_per_step()` prompts of a shuffled pass over the prompts (reshuffled after each pass)."""
        return [self.prompts[i] for i in self.order.take(self.config.samples_per_step())]

    def _set_lr(self) -> float:
        """This step's learning rate (`lr_schedule`), set on the optimizer."""
        lr = self.config.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    # ------------------------------------------------------------------------------------------------------
    # Reference pass and reward
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _reference(self, ro: Rollout, want_hidden: bool):
        """Base model (adapters disabled): ref log-probs [B, R] and, if asked, final hidden states [B, T, H]."""
        with self.model.disable_adapter():
            fo = forward_response(self.model, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                  self.config.temperature, want_hidden=want_hidden,
                                  share_prefix=self.config.share_prompt_prefix, pack=self.pack_rows)
        return fo.logp, fo.hidden

    @torch.no_grad()
    def _score(self, ro: Rollout, base_hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward-model scores [B], scores after the missing-EOS penalty and clipping [B])."""
        kwargs = dict(model=self.model, input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                      response_mask=ro.full_response_mask)
        if getattr(self.reward_fn, "uses_base_hidden", False):
            kwargs["base_hidden"] = base_hidden
        try:
            raw = self.reward_fn(**kwargs)
        finally:
            self._activate_policy()
        raw = torch.as_tensor(raw).detach().to(self.device, torch.float32).reshape(-1)
        if raw.numel() != ro.query_ids.shape[0]:
            raise ValueError(f"reward_fn returned {raw.numel()} scores for {ro.query_ids.shape[0]} sequences")
        scores = raw
        if self.config.score_clip > 0:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        scores = scores - self.config.missing_eos_penalty * (~ro.has_eos).float()
        return raw, scores

    # ------------------------------------------------------------------------------------------------------
    # Collect: rollout, policy pass, reference pass, scores
    # ------------------------------------------------------------------------------------------------------

    def collect(self, prompts: list) -> tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
        """What every online algorithm starts from (steps 1-3 and the score of step 4), under `lm.lock`: the
        rollout with its old log-probs, values and entropy; the reference log-probs [B, R]; the raw reward-model
        scores [B] and the scores after the missing-EOS penalty and clipping [B]; the clock at each boundary."""
        cfg = self.config
        t_start = time.perf_counter()

        # ---- 1. rollout: sample responses with the policy -------------------------------------------------
        with torch.no_grad():
            seqs = encode_prompts(self.lm, prompts, cfg.max_prompt_tokens)
            q, qm = left_pad(seqs, self.lm.pad_token_id, self.device)
            with self._policy_for_generation():
                gen_hidden = None
                if self.logprobs_from_generation:   # (ids, hidden) pair
                    resp, gen_hidden = sample(self.model, q, qm, cfg.max_new_tokens, cfg.temperature,
                                              cfg.top_p, self.lm.eos_token_id, self.lm.pad_token_id,
                                              capture_hidden=True, merge_lora=self._merge_in_sampler)
                else:                               # bare ids
                    resp = sample(self.model, q, qm, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                  self.lm.eos_token_id, self.lm.pad_token_id,
                                  merge_lora=self._merge_in_sampler)
            rmask, has_eos = mask_after_eos(resp, self.lm.eos_token_id)
            resp = torch.where(rmask.bool(), resp, torch.full_like(resp, self.lm.pad_token_id))
            ro = Rollout(q, qm, resp, rmask, has_eos, prompts)
        t_gen = time.perf_counter()

        # ---- 2. policy pass: old log-probs, values, entropy ------------------------------------------------
        # from the hidden states recorded while sampling (no second trunk forward), or one forward
        with torch.no_grad():
            if gen_hidden is not None:
                fo = heads_on_hidden(causal_lm_of(self.model).get_output_embeddings(), gen_hidden, resp,
                                     cfg.temperature, self.value_head, want_entropy=True,
                                     softcap=output_softcap(self.model))
            else:
                with self._fused():     # the training passes' LoRA math and layout: the first ratio is ~1
                    fo = forward_response(self.model, q, qm, resp, rmask, cfg.temperature,
                                          value_head=self.value_head, want_entropy=True,
                                          share_prefix=self._share_prefix_in_training, pack=self.pack_rows)
            ro.old_logp, ro.values, ro.entropy = fo.logp, fo.values, fo.entropy
            del gen_hidden
        t_pol = time.perf_counter()

        # ---- 3. reference pass: ref log-probs (+ base hidden states for the reward) -----------------------
        uses_hidden = bool(getattr(self.reward_fn, "uses_base_hidden", False))
        ref_logp, base_hidden = self._reference(ro, want_hidden=uses_hidden)
        t_ref = time.perf_counter()

        # ---- 4a. score at the last token, EOS penalty -----------------------------------------------------
        raw_scores, scores = self._score(ro, base_hidden)
        return ro, ref_logp, raw_scores, scores, [t_start, t_gen, t_pol, t_ref]

    def collect_next(self):
        """`collect` on the step's prompts (`_next_prompts`), the policy active and in eval mode; under `lm.lock`."""
        self._activate_policy()
        self.model.eval()
        return self.collect(self._next_prompts())

    # ------------------------------------------------------------------------------------------------------
    # Update: epochs x shuffled mini-batches x micro-batches
    # ------------------------------------------------------------------------------------------------------

    def _optimise(self, ro: Rollout, advantages, returns, mask) -> dict:
        """The step's update of the policy from its rollout `ro`: advantages, returns, mask [B, R] are handed
        to the algorithm's `_micro_step` (`returns` is the algorithm's: PPO's returns, the groups' reference
        log-probs). Returns the mean of each LOSS_STATS over the micro-batches, and the mean gradient norm."""
        cfg = self.config
        B = ro.query_ids.shape[0]
        train_mode = cfg.lora_dropout > 0 or cfg.gradient_checkpointing
        self.model.train(train_mode)
        sums = dict.fromkeys(self.LOSS_STATS, 0.0)
        n_micro = n_opt = 0
        # each row's first prompt column, response length and prompt length, on the host once: trimming and
        # packing a micro-batch then need no wait for the GPU
        qm, rm = ro.query_mask.float(), ro.response_mask.float()
        host = torch.stack([qm.argmax(1), rm.sum(1), qm.sum(1)]).cpu()
        # The fused AdamW (CUDA) skips its step inside the kernel where `found_inf` is set: a non-finite gradient
        # norm then stops this and every later step without the host reading each norm back (a wait for the GPU
        # per step, after which it idles while the next kernels are launched). The norms are read once, at the end.
        skip_on_device = bool(self.optimizer.defaults.get("fused"))
        non_finite = torch.zeros((), device=self.device) if skip_on_device else None
        norms = []
        try:
            with ExitStack() as passes:
                self._enter_update_passes(passes)
                for _ in range(cfg.epochs_per_step()):
                    perm = torch.randperm(B, generator=self._gen)
                    perm_dev = perm.to(self.device)
                    for mb in range(0, B, cfg.mini_batch_size):
                        rows, rows_dev = perm[mb:mb + cfg.mini_batch_size], perm_dev[mb:mb + cfg.mini_batch_size]
                        # ---- forward and backward of the mini-batch's micro-batches -----------------------------
                        self.optimizer.zero_grad(set_to_none=True)
                        sums_before = {k: v.clone() if torch.is_tensor(v) else v for k, v in sums.items()} \
                            if self.compiled else None
                        try:
                            n_micro += self._backward(ro, rows, rows_dev, host, advantages, returns, mask, sums)
                        except Exception as e:
                            if not (self.compiled and compile_failure(e)):
                                raise
                            # the compiled passes failed (compiling, or losing a gradient) before this mini-batch's
                            # step: redo it eagerly, its gradients and statistics so far dropped
                            passes.close()          # out of the compiled layers
                            self._fall_back_to_eager(e)
                            self._enter_update_passes(passes)
                            sums.update(sums_before)
                            self.optimizer.zero_grad(set_to_none=True)
                            n_micro += self._backward(ro, rows, rows_dev, host, advantages, returns, mask, sums)
                        # ---- clip, then the optimizer step ------------------------------------------------------
                        if cfg.max_grad_norm > 0:
                            gn = torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm)
                        else:
                            gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self._params
                                                if p.grad is not None))
                        if skip_on_device:          # this step and all after a non-finite one do nothing
                            non_finite = torch.maximum(non_finite, (~torch.isfinite(gn)).float())
                            self.optimizer.found_inf = non_finite
                        elif not math.isfinite(gn := float(gn)):   # stop before the step writes NaN
                            non_finite_norm(gn, self.algorithm)
                        norms.append(gn)
                        self.optimizer.step()
                        n_opt += 1
        finally:
            self.optimizer.__dict__.pop("found_inf", None)
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        norms = torch.stack(norms).tolist() if skip_on_device and norms else norms    # one read for all
        for gn in norms:
            if not math.isfinite(gn):
                non_finite_norm(gn, self.algorithm)
        out = {k: float(v) / max(n_micro, 1) for k, v in sums.items()}
        out["grad_norm"] = sum(norms) / max(n_opt, 1)
        for k, v in out.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"{self.algorithm.upper()} {k} is {v}; lower lr or check the reward")
        return out

    def _backward(self, ro: Rollout, rows, rows_dev, host, advantages, returns, mask, sums: dict) -> int:
        """Forward and backward of one mini-batch's `rows` in micro-batches (the gradients add up); returns how
        many. host: each row's first prompt column, response length and prompt length, on the host."""
        micro = self.config.mini_batch_size // self.config.grad_accum
        first_col, resp_len, prompt_len = host
        n = 0
        for i in range(0, len(rows), micro):
            r = rows[i:i + micro]
            cols = (int(first_col[r].min()), int(resp_len[r].max()))
            self._micro_step(ro, rows_dev[i:i + micro], cols, advantages, returns, mask, sums,
                             prompt_lengths=prompt_len[r].long().tolist())
            n += 1
        if self._gradients_unchecked:
            self._check_every_tensor_got_a_gradient()
            self._gradients_unchecked = False
        return n

    # ------------------------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------------------------

    def train(self, steps: int | None = None, callback: Callable[[dict], None] | None = None,
              stop: Callable[[], bool] | None = None,
              on_checkpoint: Callable[[bytes, int], None] | None = None) -> list[dict]:
        """Run until `steps` (default config.steps) PPO steps are done in total or `stop()` returns True
        (checked between steps). `callback(metrics)` after each step; `on_checkpoint(state_bytes, step)` every
        `config.checkpoint_every` steps and at the end. Returns the metrics of the steps run here."""
        target = steps if steps is not None else self.config.steps
        history = []
        while self.step_count < target:
            if stop is not None and stop():
                break
            m = self.step()
            history.append(m)
            if callback is not None:
                callback(m)
            every = self.config.checkpoint_every
            if on_checkpoint is not None and every and self.step_count % every == 0:
                on_checkpoint(self.state_bytes(), self.step_count)
        if on_checkpoint is not None and history and not (self.config.checkpoint_every and
                                                          self.step_count % self.config.checkpoint_every == 0):
            on_checkpoint(self.state_bytes(), self.step_count)
        return history

def non_finite_norm(gn: float, algorithm: str):
    raise FloatingPointError(f"{algorithm.upper()} gradient norm is {gn}: the update was not applied (the adapter "
                             "keeps its last finite weights); lower lr or check the reward")
