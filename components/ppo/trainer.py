"""PPOTrainer: LoRA PPO on one shared base model, readable top to bottom.

One base model serves four roles:
    policy     = base + LoRA adapter `config.adapter_name` (peft; other adapters on `lm.model` are kept)
    reference  = the same base with adapters disabled (`with model.disable_adapter():`)
    value      = a linear head on the policy's final hidden states (shared trunk: one forward gives
                 log-probs and values)
    reward     = `reward_fn` (see rewards.py); when `reward_fn.uses_base_hidden`, it reads the base's hidden
                 states from the reference pass, so scoring costs no extra forward.

One `step()` (Huang et al., "The N Implementation Details of RLHF with PPO"):
    1. rollout       sample one response per prompt (dropout off, temperature T, stop at EOS)
    2. policy pass   old log-probs (at temperature T) + values + entropy: the output and value heads on the
                     final hidden states recorded while sampling (fp32), or one no-grad forward (bf16, 4/8-bit)
    3. reference     ref log-probs (+ base hidden states for the reward), one no-grad forward, adapters off
    4. reward        score at the last response token; -missing_eos_penalty when no EOS; per-token -beta*KL
    5. GAE           advantages and returns; advantages whitened over the batch
    6. optimise      ppo_epochs x shuffled minibatches (x grad_accum micro-batches): clipped policy loss
                     + vf_coef * clipped value loss - ent_coef * entropy; grad-norm clip; AdamW on LoRA + head

After training the adapter stays on `lm.model` under `config.adapter_name`: generate with it through
`generate_with_adapter(lm, prompts, adapter_name)` (or `lm.model.set_adapter(name)`; the base alone is
`with lm.model.disable_adapter(): ...`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch

from ..attention import avoid_cudnn_attention, packing_supported, prefix_sharing_supported, varlen_available
from ..fastgen import graph_capture_failure, quantized_base
from ..fused_lora import fused_lora
from . import core
from .config import PPOConfig
from .rewards import value_head_from_pooled_head
from .rollout import Rollout, causal_lm_of, encode_prompts, forward_response, heads_on_hidden, left_pad, \
    fast_sampling_enabled, fast_sampling_unsupported, mask_after_eos, output_softcap, sample

STATE_FORMAT = "rlhf-studio-ppo-state/1"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The policy adapter on a shared base
# ----------------------------------------------------------------------------------------------------------

def lora_config_of(config: PPOConfig):
    from peft import LoraConfig
    tm = config.target_modules
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=tm if isinstance(tm, str) else list(tm), bias="none", task_type="CAUSAL_LM")


def attach_policy_adapter(lm, config: PPOConfig):
    """Add a fresh LoRA adapter `config.adapter_name` to `lm.model` (wrapping it in a PeftModel if needed) and
    make it the active one. Other adapters stay. An existing adapter of that name is replaced by a fresh one.
    Returns the PeftModel (also stored back into `lm.model`)."""
    from peft import PeftModel, get_peft_model
    name, lcfg = config.adapter_name, lora_config_of(config)
    model = lm.model
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            if len(model.peft_config) == 1:
                # peft cannot delete the only adapter: re-initialise it in place (shape must match)
                old = model.peft_config[name]
                if (old.r, old.lora_alpha) != (lcfg.r, lcfg.lora_alpha):
                    raise ValueError(f"adapter {name!r} already exists with another shape; reload the model "
                                     "or choose another adapter_name")
                _reset_lora(model, name)
            else:
                model.delete_adapter(name)
                model.add_adapter(name, lcfg)
        else:
            model.add_adapter(name, lcfg)
        model.set_adapter(name)
    else:
        model = get_peft_model(model, lcfg, adapter_name=name)
        lm.model = model
    return model


def _reset_lora(model, name: str) -> None:
    from peft.tuners.lora import LoraLayer
    for m in model.modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            m.reset_lora_parameters(name, True)


@contextmanager
def merged_adapter(model, name: str):
    """Inside: adapter `name` is folded into temporary copies of the base weights and all adapters are disabled,
    so generation runs plain linear layers. The original weight tensors are put back on exit (no drift)."""
    from peft.tuners.lora import LoraLayer
    saved = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer) and name in m.lora_A:
                    base = m.get_base_layer()
                    w = base.weight
                    merged = (w.float() + m.get_delta_weight(name).float()).to(w.dtype)
                    saved.append((base, w))
                    base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, w in saved:
            base.weight = w


def decoder_layer_list(decoder) -> torch.nn.ModuleList:
    """The decoder's list of transformer blocks (`layers` in Llama-like models, `h` in GPT-2-like ones)."""
    n = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    for name in ("layers", "h", "blocks"):
        mods = getattr(decoder, name, None)
        if isinstance(mods, torch.nn.ModuleList) and len(mods) and (n is None or len(mods) == n):
            return mods
    raise ValueError(f"compile: no list of decoder layers found on {type(decoder).__name__}; set compile='off'")


def compile_layers(decoder, backend: str) -> list:
    """torch.compile'd wrappers of each decoder layer (compiled lazily, dynamic shapes). Compiling block by
    block instead of the whole decoder lets every layer reuse the first one's compiled code (parameters are
    graph inputs): on this CPU the first pass of the 30-layer SmolLM2 took 11 s to trace instead of 152 s."""
    return [torch.compile(layer, backend=backend, dynamic=True) for layer in decoder_layer_list(decoder)]


def _needs_grad(module, inputs, output):
    # with frozen embeddings the first layer's input needs no gradient and every other layer's does: torch.compile
    # would build that layer a graph of its own; asking for it (one [tokens, hidden] gradient) keeps one graph
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.requires_grad_()
    return output


@contextmanager
def swapped_layers(decoder, replacements: list):
    """Inside: the decoder runs `replacements` (the compiled wrappers, same weights) in place of its layers."""
    mods = decoder_layer_list(decoder)
    original = list(mods)
    for i, m in enumerate(replacements):
        mods[i] = m
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    hook = embed.register_forward_hook(_needs_grad) if embed is not None else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        for i, m in enumerate(original):
            mods[i] = m


class CompiledGradientsMissing(RuntimeError):
    """The compiled training passes left a trainable tensor without a gradient (`_check_every_tensor_got_...`)."""


def _compile_failure(e: BaseException) -> bool:
    """An error of torch.compile itself (tracing, a backend that cannot compile: no C++ compiler, no working
    Triton, a GPU too old for it) or a compiled graph that lost a gradient, as opposed to the math failing."""
    from torch._dynamo.exc import TorchDynamoException   # loaded already where anything was compiled
    return isinstance(e, (CompiledGradientsMissing, TorchDynamoException))


def _non_finite_norm(gn: float):
    raise FloatingPointError(f"PPO gradient norm is {gn}: the update was not applied (the adapter keeps its last "
                             "finite weights); lower lr or check the reward")


def adapter_params(model, name: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of adapter `name`, in a stable order."""
    ps = [p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n + "."]
    if not ps:
        raise RuntimeError(f"adapter {name!r} has no LoRA parameters")
    return ps


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------

class PPOTrainer:
    """PPO with a LoRA policy on `lm` (a components.models.LoadedModel).

    reward_fn: the RewardFn protocol (components/ppo/rewards.py); prompts: the training prompts (text, or lists
    of token ids). `step()` runs one PPO iteration and returns its metrics; `train()` loops with a stop check.
    """

    # the statistics `_micro_step` adds up (averaged over micro-batches in each step's metrics)
    LOSS_STATS = ("policy_loss", "value_loss", "clip_frac", "approx_kl", "vf_clip_frac")

    def __init__(self, lm, reward_fn, config: PPOConfig | None = None, prompts: list | None = None,
                 device=None):
        self.lm = lm
        self.reward_fn = reward_fn
        self.config = config or PPOConfig()
        self.config.validate()
        if not prompts:
            raise ValueError("PPO needs at least one training prompt")
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
            self.model = attach_policy_adapter(lm, cfg)
            # a fresh peft wrap and a re-attached adapter draw their init differently: re-draw it here, so a
            # seed gives the same run whether or not this model has trained an adapter before in this process
            torch.manual_seed(cfg.seed)
            _reset_lora(self.model, cfg.adapter_name)
            self.model.eval()
            self.adapter_name = cfg.adapter_name
            if cfg.gradient_checkpointing:
                causal_lm_of(self.model).gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            self._lora = adapter_params(self.model, self.adapter_name)
            base_dtype = next(p for p in causal_lm_of(self.model).parameters() if not p.requires_grad).dtype
            quantized = bool(getattr(lm, "quantization", None)) or quantized_base(self.model)
            self.merge_for_generation = cfg.merges_for_sampling(quantized, base_dtype == torch.float32,
                                                                self.device.type)
            # where the merge happens: on CUDA the fast sampler merges in place (its CUDA graphs hold the weights'
            # addresses, so a merged copy would mean a new capture every step); elsewhere a temporary merged copy
            self._merge_in_sampler = self.merge_for_generation and self.device.type == "cuda" and \
                fast_sampling_enabled()
            # fp32 adapters on a bf16 base: the fused passes' LoRA matmuls in bf16 (`PPOConfig.lora_precision`)
            self.half_lora = cfg.half_lora(self.device.type, base_dtype == torch.bfloat16)
            # ---- training passes through compiled decoder layers (same weights; compiled lazily) -------------
            compiled = cfg.compiles(self.device.type, quantized)
            decoder = causal_lm_of(self.model).get_decoder()
            self._compiled_layers = compile_layers(decoder, cfg.compile_backend) if compiled else None
            # and the log-probs from the head's logits: one fused reduction over the bf16 logits [rows, R, V]
            # instead of eager's fp32 copy of them and logsumexp's passes over it, forward and backward
            self._logprobs_fn = torch.compile(core.logprobs_from_logits, backend=cfg.compile_backend,
                                              dynamic=True) if compiled else None
            # the compiled graphs' gradients are checked once, on the first update (_check_every_tensor_got...)
            self._gradients_unchecked = compiled
            # why training went on eagerly, where the compiled passes failed (`_fall_back_to_eager`)
            self.compile_fallback: str | None = None
            # passes without a shared prefix run packed rows (`PPOConfig.pack_rows`). On CUDA or compiled, only
            # where one kernel does it: the row-by-row fallback launches a kernel per row and reads the row starts
            # to the host, which a graph cannot
            self.pack_rows = cfg.pack_rows and packing_supported(
                decoder.config, cfg.max_prompt_tokens + cfg.max_new_tokens) and (
                varlen_available(self.device, decoder.get_input_embeddings().weight.dtype)
                if compiled or self.device.type == "cuda" else True)
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

        # ---- KL controller --------------------------------------------------------------------------------
        self.kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else core.FixedKLController(cfg.kl_coef))

        self.step_count = 0
        self._perm = torch.randperm(len(self.prompts), generator=self._gen)
        self._pos = 0

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
        why = fast_sampling_unsupported(self.model) if fast_sampling_enabled() else None
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

    def _activate_policy(self) -> None:
        """Make the policy adapter active and trainable again (a reward function may have switched adapters)."""
        if list(self.model.active_adapters) != [self.adapter_name]:
            self.model.set_adapter(self.adapter_name)
        for p in self._lora:
            p.requires_grad_(True)

    def _policy_for_generation(self):
        """Context in which `self.model.generate` samples from the policy (merged weights when enabled)."""
        if self.merge_for_generation and not self._merge_in_sampler:
            return merged_adapter(self.model, self.adapter_name)
        return nullcontext()

    def _next_prompts(self) -> list:
        """The next batch_size prompts of a shuffled pass over the prompts (reshuffled after each pass)."""
        out = []
        while len(out) < self.config.batch_size:
            if self._pos >= len(self._perm):
                self._perm = torch.randperm(len(self.prompts), generator=self._gen)
                self._pos = 0
            out.append(self.prompts[int(self._perm[self._pos])])
            self._pos += 1
        return out

    def _current_lr(self) -> float:
        cfg = self.config
        if cfg.lr_schedule == "linear":
            return cfg.lr * max(0.0, 1.0 - self.step_count / cfg.steps)
        return cfg.lr

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

    def step(self) -> dict:
        cfg = self.config
        with self.lm.lock:
            self._activate_policy()
            self.model.eval()
            prompts = self._next_prompts()
            # ---- 1-3. rollout, policy pass, reference pass (`collect`) -------------------------------------
            ro, ref_logp, raw_scores, scores, (t_start, t_gen, t_pol, t_ref) = self.collect(prompts)
            rmask, has_eos = ro.response_mask, ro.has_eos

            # ---- 4. reward: the score at the last token (`collect`), per-token KL penalty -----------------
            mask = rmask.float()
            beta = self.kl_ctl.value
            rewards, kl = core.kl_penalized_rewards(scores, ro.old_logp, ref_logp, mask, beta)
            if cfg.whiten_rewards:
                rewards = core.masked_whiten(rewards, mask, shift_mean=False) * mask
            t_score = time.perf_counter()

            # ---- 5. advantages: GAE, then whitened over the batch ------------------------------------------
            values = ro.values * mask
            advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = core.masked_whiten(advantages, mask) * mask

            # ---- 6. optimise: ppo_epochs x shuffled minibatches x grad_accum micro-batches ------------------
            lr = self._current_lr()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
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
                            if not (self.compiled and _compile_failure(e)):
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
                            _non_finite_norm(gn)
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
                _non_finite_norm(gn)
        out = {k: float(v) / max(n_micro, 1) for k, v in sums.items()}
        out["grad_norm"] = sum(norms) / max(n_opt, 1)
        for k, v in out.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"PPO {k} is {v}; lower lr or check the reward")
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
        pl, cf, akl = core.policy_loss(fo.logp, ro.old_logp[idx, :R], advantages[idx, :R], m, cfg.cliprange)
        vl, vcf = core.value_loss(fo.values, ro.values[idx, :R], returns[idx, :R], m, cfg.cliprange_value)
        loss = pl + cfg.vf_coef * vl
        if cfg.ent_coef > 0:
            loss = loss - cfg.ent_coef * core.masked_mean(fo.entropy, m)
        (loss / cfg.grad_accum).backward()
        # kept on the device: a float() here would wait for the GPU five times per micro-batch
        sums["policy_loss"] += pl.detach()
        sums["value_loss"] += vl.detach()
        sums["clip_frac"] += cf.detach()
        sums["approx_kl"] += akl.detach()
        sums["vf_clip_frac"] += vcf.detach()

    def _display(self, ro: Rollout, scores: torch.Tensor) -> list[dict]:
        n = min(self.config.n_display_samples, len(ro.prompts))
        tok = self.lm.tokenizer
        out = []
        for i in range(n):
            ids = ro.response_ids[i, : int(ro.response_mask[i].sum())].tolist()
            p = ro.prompts[i]
            out.append({"prompt": p if isinstance(p, str) else _decode(tok, p),
                        "response": _decode(tok, ids), "reward": float(scores[i])})
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
                    d = {"prompt": p if isinstance(p, str) else _decode(self.lm.tokenizer, p),
                         "response": _decode(self.lm.tokenizer, ids), "length": len(ids),
                         "has_eos": bool(has_eos[i])}
                    if score:
                        d["score"], d["reward"] = float(raw[i]), float(sc[i])
                    out.append(d)
        return out

    @torch.no_grad()
    def probe(self, prompts: list, max_new_tokens: int | None = None, seed: int = 0) -> dict:
        """What the reward-hacking watch (components/ppo/watch.py) reads: one response per prompt, sampled from
        the policy at the training temperature with a fixed seed (the same random stream at every check), the
        global RNG restored afterwards so that probing does not change the run. Returns, for B prompts:
        {"prompts": [B] text, "responses": [B] text, "token_ids": [B] lists of response ids (up to EOS),
        "has_eos": [B] bool, "score": [B] float (raw reward model), "kl": [B] float (sum over the response of
        log pi - log ref, the trainer's KL estimate), "features": tensor [B, 2H] (pooled base features, what the
        fast reward tier reads)}."""
        from ..reward.features import pool_features
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
        return {"prompts": [p if isinstance(p, str) else _decode(self.lm.tokenizer, p) for p in prompts],
                "responses": [_decode(self.lm.tokenizer, x) for x in ids], "token_ids": ids,
                "has_eos": [bool(x) for x in has_eos], "score": [float(x) for x in raw],
                "kl": [float(x) for x in ((logp - ref_logp) * rmask).sum(1)], "features": feats.cpu()}

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints and export
    # ------------------------------------------------------------------------------------------------------

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict
        sd = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}

    def _adapter_config_dict(self) -> dict:
        pc = self.model.peft_config[self.adapter_name]
        d = pc.to_dict()
        d["inference_mode"] = True
        return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

    def adapter_bytes(self) -> bytes:
        """The policy adapter's weights as safetensors bytes (peft key format, as adapter_model.safetensors);
        the adapter config is in the metadata under "adapter_config"."""
        from safetensors.torch import save
        return save(self._adapter_state(), metadata={"format": "pt",
                                                     "adapter_config": json.dumps(self._adapter_config_dict())})

    def state_bytes(self) -> bytes:
        """A complete checkpoint in one safetensors blob: adapter, value head, optimizer state, RNG states,
        prompt order; JSON metadata holds the config, step, KL controller and optimizer hyper-parameters.
        Loading never unpickles anything."""
        from safetensors.torch import save
        t: dict[str, torch.Tensor] = {}
        for k, v in self._adapter_state().items():
            t["adapter." + k] = v
        t["value_head.weight"] = self.value_head.weight.detach().cpu().clone()
        t["value_head.bias"] = self.value_head.bias.detach().cpu().clone()
        osd = self.optimizer.state_dict()
        for i, st in osd["state"].items():
            for k, v in st.items():
                t[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        t["rng.torch"] = torch.get_rng_state().clone()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                t[f"rng.cuda.{i}"] = s.clone()
        t["rng.trainer"] = self._gen.get_state().clone()
        t["prompts.perm"] = self._perm.clone()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
        meta = {"format": STATE_FORMAT, "config": self.config.to_dict(), "step": self.step_count,
                "prompt_pos": self._pos, "n_prompts": len(self.prompts), "kl_ctl": self.kl_ctl.state_dict(),
                "optim_groups": groups, "n_params": len(self._params), "adapter_name": self.adapter_name,
                "value_head_source": self.value_head_source}
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
        stored = PPOConfig.from_dict(meta["config"])
        for k in ("lora_r", "lora_alpha", "target_modules"):
            if getattr(stored, k) != getattr(self.config, k):
                raise ValueError(f"checkpoint has {k}={getattr(stored, k)!r}, trainer has "
                                 f"{getattr(self.config, k)!r}")
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
            state: dict[int, dict] = {}
            for k, v in t.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    state.setdefault(int(i), {})[name] = v
            osd = self.optimizer.state_dict()
            groups = []
            for g, saved in zip(osd["param_groups"], meta["optim_groups"]):
                # hyper-parameters from the checkpoint; the implementation (fused on CUDA) is this device's
                groups.append({**saved, "params": g["params"], **{k: g[k] for k in ("fused", "foreach") if k in g}})
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
            self.kl_ctl.load_state_dict(meta["kl_ctl"])
            self.step_count = int(meta["step"])
            if meta.get("n_prompts") == len(self.prompts):
                self._perm = t["prompts.perm"].clone()
                self._pos = int(meta["prompt_pos"])
            self._gen.set_state(t["rng.trainer"].clone())
            torch.set_rng_state(t["rng.torch"].clone())
            if torch.cuda.is_available():
                cuda = [t[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in t]
                if len(cuda) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(cuda)
            self.value_head_source = meta.get("value_head_source", self.value_head_source)
        return meta

    def save_adapter(self, path: str | os.PathLike, merged: bool = False) -> Path:
        """Write the policy as a folder.

        merged=False: adapter_config.json + adapter_model.safetensors (+ value_head.safetensors), loadable with
        `peft.PeftModel.from_pretrained(base_model, path)`.
        merged=True: a full model folder (base weights + LoRA delta, config, tokenizer) loadable with
        `AutoModelForCausalLM.from_pretrained(path)`; not for 4/8-bit bases.
        """
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self.lm.lock:
            if not merged:
                save_file(self._adapter_state(), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
                cfg = self._adapter_config_dict()
                cfg["base_model_name_or_path"] = getattr(self.lm, "source_path", "") or cfg.get(
                    "base_model_name_or_path")
                (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
                save_file({"weight": self.value_head.weight.detach().cpu().contiguous(),
                           "bias": self.value_head.bias.detach().cpu().contiguous()},
                          str(path / "value_head.safetensors"))
            else:
                _save_merged(self.model, self.adapter_name, path, getattr(self.lm, "quantization", None))
                try:
                    self.lm.tokenizer.save_pretrained(str(path))
                except Exception:
                    pass
        return path


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------

def _decode(tok, ids) -> str:
    try:
        return tok.decode(ids, skip_special_tokens=True)
    except Exception:
        return " ".join(map(str, ids))


def safetensors_metadata(blob: bytes) -> dict:
    """The __metadata__ of a safetensors blob (header = 8-byte little-endian length + JSON)."""
    if len(blob) < 8:
        raise ValueError("not a safetensors blob")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8 or n > 100 * 1024 * 1024:
        raise ValueError("not a safetensors blob")
    header = json.loads(blob[8:8 + n])
    return header.get("__metadata__", {}) or {}


@torch.no_grad()
def _save_merged(model, adapter_name: str, path: Path, quantization) -> None:
    """Base weights + this adapter's LoRA delta, saved as a plain transformers model folder."""
    if quantization:
        raise ValueError("merged export needs an unquantized base (load it in bf16/fp32)")
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    lm = causal_lm_of(model)
    sd: dict[str, torch.Tensor] = {}
    lora_modules = {n: m for n, m in lm.named_modules() if isinstance(m, LoraLayer)}
    for name, m in lora_modules.items():
        base = m.get_base_layer()
        w = base.weight.detach()
        if adapter_name in m.lora_A:
            w = (w.float() + m.get_delta_weight(adapter_name).float()).to(w.dtype)
        sd[f"{name}.weight"] = w
        if getattr(base, "bias", None) is not None:
            sd[f"{name}.bias"] = base.bias.detach()
    for n, p in lm.state_dict().items():          # persistent tensors only (no rotary caches)
        if "lora_" in n or ".base_layer." in n:
            continue
        sd.setdefault(n, p.detach())
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(lm.config, dtype=next(lm.parameters()).dtype)
    missing, unexpected = clean.load_state_dict(sd, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(lm.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merged export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        clean.tie_weights()
    clean.generation_config = lm.generation_config
    clean.save_pretrained(str(path))


def generate_with_adapter(lm, prompts: list, adapter_name: str | None = "policy", max_new_tokens: int = 64,
                          temperature: float = 0.7, top_p: float = 1.0, greedy: bool = False,
                          max_prompt_tokens: int = 1024) -> list[str]:
    """Generate one response per prompt with adapter `adapter_name` of `lm.model` (None: the base model with
    all adapters disabled). The previously active adapter is restored afterwards."""
    from peft import PeftModel
    model = lm.model
    with lm.lock, torch.no_grad():
        seqs = encode_prompts(lm, prompts, max_prompt_tokens)
        q, qm = left_pad(seqs, lm.pad_token_id, lm.device)
        if isinstance(model, PeftModel):
            prev = list(model.active_adapters)
            if adapter_name is None:
                ctx = model.disable_adapter()
            else:
                if adapter_name not in model.peft_config:
                    raise ValueError(f"no adapter named {adapter_name!r} on this model")
                model.set_adapter(adapter_name)
                ctx = nullcontext()
            try:
                with ctx:
                    resp = sample(model, q, qm, max_new_tokens, temperature, top_p, lm.eos_token_id,
                                  lm.pad_token_id, greedy=greedy)
            finally:
                if adapter_name is not None and prev and prev != [adapter_name]:
                    model.set_adapter(prev[0] if len(prev) == 1 else prev)
        else:
            if adapter_name is not None:
                raise ValueError("this model has no adapters")
            resp = sample(model, q, qm, max_new_tokens, temperature, top_p, lm.eos_token_id, lm.pad_token_id,
                          greedy=greedy)
        rmask, _ = mask_after_eos(resp, lm.eos_token_id)
    return [_decode(lm.tokenizer, resp[i, : int(rmask[i].sum())].tolist()) for i in range(len(prompts))]
