"""Which shortcuts the online engine's passes take on this base and device, and where one falls back.

Same math either way (tests/test_ppo_learning.py, tests/test_ppo_speedups.py compare each with the plain pass):
    merged sampling    rollouts sample with the LoRA merged into the base weights (`merge_for_generation`)
    generation hidden  the old log-probs from the hidden states recorded while sampling (`old_logprobs`)
    fused LoRA         the LoRA product inside the base layer's matmul, optionally in the base's half dtype
    compiled layers    the update's passes through torch.compile'd decoder layers; a failure of compiling, or a
                       compiled graph that drops a gradient, falls back to eager passes with a note
    packed rows        passes without a shared prompt prefix run the rows packed into one sequence
    shared prefix      the prompt prefix all rows share runs once (not through compiled layers)
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, nullcontext

import torch

from ...attention import packing_supported, prefix_sharing_supported
from ...fastgen import fast_path_enabled, graph_capture_failure
from ...fused_lora import fused_lora
from ...model_utils import causal_lm_of
from .acceleration import CompiledGradientsMissing, compile_layers, row_layout, swapped_layers
from .adapter import merged_adapter
from .ops import logprobs_from_logits
from .rollout import fast_sampling_unsupported

log = logging.getLogger(__name__)


class AcceleratedPasses:
    """The online engine's pass settings (a mixin of OnlineEngine; reads its `model`, `config`, `device`,
    `adapter_name` and `_params`)."""

    def _set_up_passes(self, quantized: bool, base_dtype: torch.dtype) -> None:
        """Decide each shortcut for this base and device (under `lm.lock`, the policy attached)."""
        cfg = self.config
        self.merge_for_generation = cfg.merges_for_sampling(quantized, base_dtype == torch.float32,
                                                            self.device.type)
        # where the merge happens: on CUDA the fast sampler merges in place (its CUDA graphs hold the weights'
        # addresses, so a merged copy would mean a new capture every step); elsewhere a temporary merged copy
        self._merge_in_sampler = self.merge_for_generation and self.device.type == "cuda" and fast_path_enabled()
        # fp32 adapters on a bf16 base: the fused passes' LoRA matmuls in bf16 (`lora_precision`)
        self.half_lora = cfg.half_lora(self.device.type, base_dtype == torch.bfloat16)
        # ---- training passes through compiled decoder layers (same weights; compiled lazily) -----------------
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
        """Training passes run through torch.compile'd decoder layers (`OnlineConfig.compile`)."""
        return self._compiled_layers is not None

    def _policy_for_generation(self):
        """Context in which `self.model.generate` samples from the policy (merged weights when enabled)."""
        if self.merge_for_generation and not self._merge_in_sampler:
            return merged_adapter(self.model, self.adapter_name)
        return nullcontext()

    @property
    def _share_prefix_in_training(self) -> bool:
        # the shared prefix's cache does not go through the compiled layers
        return self.config.share_prompt_prefix and self._compiled_layers is None

    def _fused(self):
        """The LoRA forward of the policy and training passes: the fused one (same math, fewer passes; its LoRA
        matmuls in the base's half dtype where `OnlineConfig.lora_precision` says so), or peft's when turned off."""
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
