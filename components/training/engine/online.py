"""The online engine: sample from the LoRA policy, score, and update it in mini-batches, as fast as the math allows.

One base model serves four roles:
    policy     = base + LoRA adapter `config.adapter_name` (peft; other adapters on `lm.model` are kept)
    reference  = the same base with adapters disabled (`with model.disable_adapter():`)
    value      = a linear head on the policy's final hidden states (shared trunk: one forward gives
                 log-probs and values; only PPO trains it)
    reward     = `reward_fn` (components/training/rewards.py); when `reward_fn.uses_base_hidden`, it reads the
                 base's hidden states from the reference pass, so scoring costs no extra forward.

What the engine does for an algorithm (components/training/ppo.py, rloo.py, grpo.py):
    collect      1. rollout: sample one response per prompt (dropout off, temperature T, stop at EOS)
                 2. policy pass: old log-probs (at temperature T) + values + entropy, from the final hidden
                    states recorded while sampling (fp32) or one no-grad forward (bf16, 4/8-bit)
                 3. reference pass: ref log-probs (+ base hidden states for the reward), adapters off
                 4. scores at the last response token, -missing_eos_penalty where no EOS, clipped
    _optimise    epochs x shuffled mini-batches x grad_accum micro-batches of the algorithm's `_micro_step`,
                 through the fused LoRA / compiled / packed passes; grad-norm clip; AdamW
    train, generate_samples, probe, state_bytes / load_state_bytes, save_adapter

After training the adapter stays on `lm.model` under `config.adapter_name`: generate with it through
`generate_with_adapter(lm, prompts, adapter_name)` (engine/adapter.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable

import torch

from ...attention import avoid_cudnn_attention, packing_supported, prefix_sharing_supported
from ...fastgen import fast_path_enabled, graph_capture_failure, quantized_base
from ...fused_lora import fused_lora
from ...model_utils import causal_lm_of, safetensors_metadata
from ..ppo_config import PPOConfig
from ..rewards import value_head_from_pooled_head
from .acceleration import CompiledGradientsMissing, compile_failure, compile_layers, row_layout, swapped_layers
from .adapter import PolicyAdapter, adapter_config_dict, adapter_state, decode, merged_adapter, save_adapter_folder
from .checkpoint import ShuffledPass, check_lora_shape, load_optimizer, optimizer_tensors
from .ops import logprobs_from_logits
from .rollout import (Rollout, encode_prompts, fast_sampling_unsupported, forward_response, heads_on_hidden,
                      left_pad, mask_after_eos, output_softcap, sample)

STATE_FORMAT = "rlhf-studio-ppo-state/1"     # a stored format: runs stored under it must keep loading

log = logging.getLogger(__name__)


class OnlineEngine(PolicyAdapter):
    """What every online algorithm runs on `lm` (a components.models.LoadedModel): the LoRA policy, sampling,
    the policy and reference passes, scoring (`collect`), the update loop (`_optimise`: epochs x shuffled
    mini-batches x micro-batches, with the compiled / fused / packed passes), evaluation, checkpoints, export.

    reward_fn: the RewardFn protocol (components/training/rewards.py); prompts: the training prompts (text, or
    lists of token ids); config: a PPOConfig (the engine's settings; other algorithms map theirs onto it).
    An algorithm subclasses it with `step()`, `_micro_step()` (the loss of one micro-batch) and `LOSS_STATS`.
    """

    algorithm = ""
    # the statistics `_micro_step` adds up (averaged over micro-batches in each step's metrics)
    LOSS_STATS: tuple[str, ...] = ()

    def __init__(self, lm, reward_fn, config: PPOConfig | None = None, prompts: list | None = None,
                 device=None):
        self.lm = lm
        self.reward_fn = reward_fn
        self.config = config or PPOConfig()
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
            self.merge_for_generation = cfg.merges_for_sampling(quantized, base_dtype == torch.float32,
                                                                self.device.type)
            # where the merge happens: on CUDA the fast sampler merges in place (its CUDA graphs hold the weights'
            # addresses, so a merged copy would mean a new capture every step); elsewhere a temporary merged copy
            self._merge_in_sampler = self.merge_for_generation and self.device.type == "cuda" and \
                fast_path_enabled()
            # fp32 adapters on a bf16 base: the fused passes' LoRA matmuls in bf16 (`PPOConfig.lora_precision`)
            self.half_lora = cfg.half_lora(self.device.type, base_dtype == torch.bfloat16)
            # ---- training passes through compiled decoder layers (same weights; compiled lazily) -------------
            compiled = cfg.compiles(self.device.type, quantized)
            decoder = causal_lm_of(self.model).get_decoder()
            self._compiled_layers = compile_layers(decoder, cfg.compile_backend) if compiled else None
            # and the log-probs from the head's logits: one fused reduction over the bf16 logits [rows, R, V]
            # instead of eager's fp32 copy of them and logsumexp's passes over it, forward and backward
            self._logprobs_fn = torch.compile(logprobs_from_logits, backend=cfg.compile_backend,
                                              dynamic=True) if compiled else None
            # the compiled graphs' gradients are checked once, on the first update (_check_every_tensor_got...)
            self._gradients_unchecked = compiled
            # why training went on eagerly, where the compiled passes failed (`_fall_back_to_eager`)
            self.compile_fallback: str | None = None
            # the passes' row layout: the prompt tree on the CPU, else packed rows where no prefix is shared
            self.pack_rows = row_layout(cfg.pack_rows, cfg.tree_rows, decoder,
                                        cfg.max_prompt_tokens + cfg.max_new_tokens, self.device, compiled)
            self.logprobs_from_generation = cfg.old_logprobs == "generation" or (
                cfg.old_logprobs == "auto" and not quantized and base_dtype == torch.float32)

            # ---- value head on the policy trunk ----------------------------------------------------------
            mcfg = causal_lm_of(self.model).config
            H = (mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg).hidden_size
            self.value_head = torch.nn.Linear(H, 1).to(self.device, torch.float32)
            self.value_head_source = self._init_value_head()

        # ---- optimiser: LoRA + value head only ----------------------------------------------------------
        self._params = self._lora + list(self.value_head.parameters())
        # fused on CUDA: one kernel for all tensors (the foreach step launched ~8 ms of kernels per update at
        # 1.7B, r=16, in an H100 profile); the CPU keeps the default implementation
        self.optimizer = torch.optim.AdamW(self._params, lr=cfg.lr, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, fused=self.device.type == "cuda" or None)

        self.step_count = 0
        self.order = ShuffledPass(len(self.prompts), self._gen, "prompts.perm", "prompt_pos", "n_prompts")

    # ------------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------------

    def _init_value_head(self) -> str:
        vh = self.value_head
        with torch.no_grad():
            vh.weight.zero_()
            vh.bias.zero_()
            if self.config.value_head_init != "reward":
                return "zeros"
            init = getattr(self.reward_fn, "value_head_init", None)
            if callable(init):
                w, b = init()
            elif all(isinstance(getattr(self.reward_fn, a, None), torch.Tensor) for a in ("weight", "mean", "std")):
                # a linear head on pooled features (e.g. components.reward.ppo_reward.FastRewardFn)
                rf = self.reward_fn
                w, b = value_head_from_pooled_head(rf.weight, float(getattr(rf, "bias", 0.0)), rf.mean, rf.std)
            else:
                return "zeros"
            w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
            if w.numel() != vh.weight.numel():
                return "zeros"
            vh.weight.copy_(w.view_as(vh.weight).to(vh.weight.device))
            vh.bias.fill_(float(b))
            return "reward"

    @property
    def notes(self) -> list[str]:
        """What this run does otherwise than its config asks, and why (the studio keeps them with the run)."""
        notes = [self.compile_fallback] if self.compile_fallback else []
        why = fast_sampling_unsupported(self.model) if fast_path_enabled() else None
        if why:
            notes.append(f"rollouts sample with model.generate, slower: the fast sampler does not support this "
                         f"model ({why})")
        longest = self.config.max_prompt_tokens + self.config.max_new_tokens
        dec_cfg = causal_lm_of(self.model).get_decoder().config
        if self.config.pack_rows and not packing_supported(dec_cfg, longest):   # not where the prefix is shared
            notes.append(f"training passes run padded rows, not packed ones: not supported for this model "
                         f"({dec_cfg.model_type}, or a sliding window shorter than {longest} tokens)")
        if self.config.share_prompt_prefix and not prefix_sharing_supported(dec_cfg, longest):
            notes.append(f"each row runs its whole prompt: a shared prompt prefix is not supported with a sliding "
                         f"window ({dec_cfg.sliding_window}) shorter than {longest} tokens")
        failed = graph_capture_failure(self.model)
        if failed:
            notes.append(f"rollouts decode without CUDA graphs, slower: capturing one failed ({failed})")
        return notes

    @property
    def compiled(self) -> bool:
        """Training passes run through torch.compile'd decoder layers (`PPOConfig.compile`)."""
        return self._compiled_layers is not None

    def _policy_for_generation(self):
        """Context in which `self.model.generate` samples from the policy (merged weights when enabled)."""
        if self.merge_for_generation and not self._merge_in_sampler:
            return merged_adapter(self.model, self.adapter_name)
        return nullcontext()

    def _next_prompts(self) -> list:
        """The next batch_size prompts of a shuffled pass over the prompts (reshuffled after each pass)."""
        return [self.prompts[i] for i in self.order.take(self.config.batch_size)]

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
    # One PPO iteration
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

    @property
    def _share_prefix_in_training(self) -> bool:
        # the shared prefix's cache does not go through the compiled layers
        return self.config.share_prompt_prefix and self._compiled_layers is None

    def _fused(self):
        """The LoRA forward of the policy and training passes: the fused one (same math, fewer passes; its LoRA
        matmuls in the base's half dtype where `PPOConfig.lora_precision` says so), or peft's when turned off."""
        return fused_lora(self.model, half=self.half_lora) if self.config.fused_lora else nullcontext()

    def _enter_update_passes(self, stack: ExitStack) -> None:
        """The update's forward: the fused LoRA layers, through the compiled decoder layers where they are on."""
        stack.enter_context(self._fused())
        if self._compiled_layers:
            stack.enter_context(swapped_layers(causal_lm_of(self.model).get_decoder(), self._compiled_layers))

    def _fall_back_to_eager(self, e: BaseException) -> None:
        """The compiled passes failed before their mini-batch's optimizer step: train eagerly from here on (same
        math) instead of failing the run; `compile_fallback` says why (the studio shows it with the run)."""
        why = " ".join(str(e).split())[:300]
        self.compile_fallback = (f"the compiled training passes failed ({type(e).__name__}: {why}); "
                                 "the run trains eagerly instead")
        log.warning("%s", self.compile_fallback)
        self._compiled_layers = self._logprobs_fn = None
        self._gradients_unchecked = False

    def _optimise(self, ro: Rollout, advantages, returns, mask) -> dict:
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
                for _ in range(cfg.ppo_epochs):
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
                            gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self._params if p.grad is not None))
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

    def _check_every_tensor_got_a_gradient(self) -> None:
        """Compiled passes once gave no gradient to part of the adapter and nothing failed: on an H100, layers
        compiled with a padding mask skipped attention's backward pass, so the q/k/v adapters never trained (the
        GPU profile showed no attention backward kernel). Checked on the first update, before it is applied."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        missing = [names.get(id(p), "value_head") for p in self._params if p.grad is None]
        # a cut graph may also hand back zeros; a B matrix's gradient is never exactly zero otherwise (A starts
        # random), while an A matrix's is while B is still zero
        b_mats = [p for p in self._params if p.grad is not None and "lora_B" in names.get(id(p), "")]
        if b_mats:
            zero = torch.stack([p.grad.abs().amax() for p in b_mats]).eq(0).tolist()    # one wait for the GPU
            missing += [names[id(p)] for p, z in zip(b_mats, zero) if z]
        if missing:
            raise CompiledGradientsMissing(f"the compiled training passes gave no gradient to {len(missing)} "
                                           f"trainable tensors (first: {missing[0]}); their update was not applied")

    def _display(self, ro: Rollout, scores: torch.Tensor) -> list[dict]:
        n = min(self.config.n_display_samples, len(ro.prompts))
        tok = self.lm.tokenizer
        out = []
        for i in range(n):
            ids = ro.response_ids[i, : int(ro.response_mask[i].sum())].tolist()
            p = ro.prompts[i]
            out.append({"prompt": p if isinstance(p, str) else decode(tok, p),
                        "response": decode(tok, ids), "reward": float(scores[i])})
        return out

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

    # ------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------

    def generate_samples(self, prompts: list, max_new_tokens: int | None = None, temperature: float | None = None,
                         top_p: float | None = None, greedy: bool = False, use_base: bool = False,
                         score: bool = True, batch_size: int | None = None) -> list[dict]:
        """Sample one response per prompt from the policy (or the base, use_base=True) and score it.

        Returns [{prompt, response, score (raw reward model), reward (after the missing-EOS penalty), length,
        has_eos}]. Uses the global RNG (seed it for reproducible evaluations)."""
        cfg = self.config
        mnt = max_new_tokens or cfg.max_new_tokens
        temp = temperature or cfg.temperature
        tp = top_p or cfg.top_p
        bs = batch_size or max(cfg.batch_size, 1)
        out = []
        with self.lm.lock:
            self._activate_policy()
            self.model.eval()
            for s in range(0, len(prompts), bs):
                chunk = list(prompts[s:s + bs])
                ctx = self.model.disable_adapter() if use_base else self._policy_for_generation()
                with torch.no_grad():
                    seqs = encode_prompts(self.lm, chunk, cfg.max_prompt_tokens)
                    q, qm = left_pad(seqs, self.lm.pad_token_id, self.device)
                    with ctx:
                        resp = sample(self.model, q, qm, mnt, temp, tp, self.lm.eos_token_id,
                                      self.lm.pad_token_id, greedy=greedy,
                                      merge_lora=self._merge_in_sampler and not use_base)
                    rmask, has_eos = mask_after_eos(resp, self.lm.eos_token_id)
                    resp = torch.where(rmask.bool(), resp, torch.full_like(resp, self.lm.pad_token_id))
                    ro = Rollout(q, qm, resp, rmask, has_eos, chunk)
                    if score:
                        _, hidden = self._reference(ro, bool(getattr(self.reward_fn, "uses_base_hidden", False)))
                        raw, sc = self._score(ro, hidden)
                for i in range(len(chunk)):
                    ids = resp[i, : int(rmask[i].sum())].tolist()
                    p = chunk[i]
                    d = {"prompt": p if isinstance(p, str) else decode(self.lm.tokenizer, p),
                         "response": decode(self.lm.tokenizer, ids), "length": len(ids),
                         "has_eos": bool(has_eos[i])}
                    if score:
                        d["score"], d["reward"] = float(raw[i]), float(sc[i])
                    out.append(d)
        return out

    @torch.no_grad()
    def probe(self, prompts: list, max_new_tokens: int | None = None, seed: int = 0) -> dict:
        """What the reward-hacking watch (components/training/watch.py) reads: one response per prompt, sampled from
        the policy at the training temperature with a fixed seed (the same random stream at every check), the
        global RNG restored afterwards so that probing does not change the run. Returns, for B prompts:
        {"prompts": [B] text, "responses": [B] text, "token_ids": [B] lists of response ids (up to EOS),
        "has_eos": [B] bool, "score": [B] float (raw reward model), "kl": [B] float (sum over the response of
        log pi - log ref, the trainer's KL estimate), "features": tensor [B, 2H] (pooled base features, what the
        fast reward tier reads)}."""
        from ...reward.features import pool_features
        cfg = self.config
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(seed)
        try:
            with self.lm.lock:
                self._activate_policy()
                self.model.eval()
                q, qm = left_pad(encode_prompts(self.lm, prompts, cfg.max_prompt_tokens), self.lm.pad_token_id,
                                 self.device)
                with self._policy_for_generation():
                    resp = sample(self.model, q, qm, max_new_tokens or cfg.max_new_tokens, cfg.temperature,
                                  cfg.top_p, self.lm.eos_token_id, self.lm.pad_token_id,
                                  merge_lora=self._merge_in_sampler)
                rmask, has_eos = mask_after_eos(resp, self.lm.eos_token_id)
                resp = torch.where(rmask.bool(), resp, torch.full_like(resp, self.lm.pad_token_id))
                ro = Rollout(q, qm, resp, rmask, has_eos, list(prompts))
                logp = forward_response(self.model, q, qm, resp, rmask, cfg.temperature,
                                        share_prefix=cfg.share_prompt_prefix, pack=self.pack_rows).logp
                ref_logp, hidden = self._reference(ro, want_hidden=True)
                raw, _ = self._score(ro, hidden)
                feats = pool_features(hidden, ro.attention_mask, ro.full_response_mask)
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        ids = [resp[i, : int(rmask[i].sum())].tolist() for i in range(len(prompts))]
        return {"prompts": [p if isinstance(p, str) else decode(self.lm.tokenizer, p) for p in prompts],
                "responses": [decode(self.lm.tokenizer, x) for x in ids], "token_ids": ids,
                "has_eos": [bool(x) for x in has_eos], "score": [float(x) for x in raw],
                "kl": [float(x) for x in ((logp - ref_logp) * rmask).sum(1)], "features": feats.cpu()}

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints and export
    # ------------------------------------------------------------------------------------------------------

    def adapter_bytes(self) -> bytes:
        """The policy adapter's weights as safetensors bytes (peft key format, as adapter_model.safetensors);
        the adapter config is in the metadata under "adapter_config"."""
        from safetensors.torch import save
        config = adapter_config_dict(self.model, self.adapter_name)
        return save(adapter_state(self.model, self.adapter_name),
                    metadata={"format": "pt", "adapter_config": json.dumps(config)})

    def _algorithm_state(self) -> dict:
        """What the algorithm adds to a checkpoint's metadata (plain JSON values; subclasses)."""
        return {}

    def _load_algorithm_state(self, meta: dict) -> None:
        """Restore `_algorithm_state` from a checkpoint's metadata (subclasses)."""

    def state_bytes(self) -> bytes:
        """A complete checkpoint in one safetensors blob: adapter, value head, optimizer state, RNG states,
        prompt order; JSON metadata holds the config, step, the algorithm's state (PPO: its KL controller) and
        optimizer hyper-parameters. Loading never unpickles anything. The format is STATE_FORMAT's, which runs
        stored by earlier versions hold (tests/test_stored_runs.py)."""
        from safetensors.torch import save
        t = {"adapter." + k: v for k, v in adapter_state(self.model, self.adapter_name).items()}
        t["value_head.weight"] = self.value_head.weight.detach().cpu().clone()
        t["value_head.bias"] = self.value_head.bias.detach().cpu().clone()
        optim, groups = optimizer_tensors(self.optimizer)
        t.update(optim)
        t["rng.torch"] = torch.get_rng_state().clone()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                t[f"rng.cuda.{i}"] = s.clone()
        t["rng.trainer"] = self._gen.get_state().clone()
        meta = {"format": STATE_FORMAT, "config": self.config.to_dict(), "step": self.step_count,
                **self._algorithm_state(), "optim_groups": groups, "n_params": len(self._params),
                "adapter_name": self.adapter_name, "value_head_source": self.value_head_source}
        self.order.save(t, meta)
        return save(t, metadata={"format": "pt", "ppo_state": json.dumps(meta)})

    def load_state_bytes(self, blob: bytes) -> dict:
        """Restore a `state_bytes()` checkpoint into this trainer (same LoRA shape). Returns its metadata."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load
        meta_all = safetensors_metadata(blob)
        if "ppo_state" not in meta_all:
            raise ValueError("not a PPO checkpoint (no ppo_state metadata)")
        meta = json.loads(meta_all["ppo_state"])
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported PPO checkpoint format {meta.get('format')!r}")
        check_lora_shape(PPOConfig.from_dict(meta["config"]).to_dict(), self.config)
        if meta["n_params"] != len(self._params):
            raise ValueError("checkpoint does not match this trainer's parameters")
        t = load(blob)
        with self.lm.lock:
            adapter = {k[len("adapter."):]: v for k, v in t.items() if k.startswith("adapter.")}
            res = set_peft_model_state_dict(self.model, adapter, adapter_name=self.adapter_name)
            unexpected = getattr(res, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint adapter has unexpected keys, e.g. {unexpected[:3]}")
            with torch.no_grad():
                self.value_head.weight.copy_(t["value_head.weight"])
                self.value_head.bias.copy_(t["value_head.bias"])
            load_optimizer(self.optimizer, t, meta["optim_groups"])
            self._load_algorithm_state(meta)
            self.step_count = int(meta["step"])
            self.order.load(t, meta)
            self._gen.set_state(t["rng.trainer"].clone())
            torch.set_rng_state(t["rng.torch"].clone())
            if torch.cuda.is_available():
                cuda = [t[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in t]
                if len(cuda) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(cuda)
            self.value_head_source = meta.get("value_head_source", self.value_head_source)
        return meta

    def save_adapter(self, path: str | os.PathLike, merged: bool = False) -> Path:
        """Write the policy as a folder (engine/adapter.py's `save_adapter_folder`); unmerged, with the value
        head beside it (value_head.safetensors)."""
        from safetensors.torch import save_file
        with self.lm.lock:
            path = save_adapter_folder(self.lm, self.model, self.adapter_name, path, merged)
            if not merged:
                save_file({"weight": self.value_head.weight.detach().cpu().contiguous(),
                           "bias": self.value_head.bias.detach().cpu().contiguous()},
                          str(path / "value_head.safetensors"))
        return path


def non_finite_norm(gn: float, algorithm: str):
    raise FloatingPointError(f"{algorithm.upper()} gradient norm is {gn}: the update was not applied (the adapter "
                             "keeps its last finite weights); lower lr or check the reward")
