"""The settings every algorithm shares (adapter, optimiser, lengths, bookkeeping) and their checks.

    TrainConfig                 every algorithm: run length, optimiser, LoRA, prompt length, shortcuts, seed
      OnlineConfig              the sampling ones: batch shape, sampling, reward shaping, clip, compile
        PPOConfig (ppo_config.py), GroupConfig (group.py: RLOOConfig, GRPOConfig)
      OfflineConfig             the labelled ones: batch shape, completion length, beta (DPOConfig, KTOConfig)

Each algorithm's config subclasses one of them, adds its own fields, each documented (or overrides a default),
and is stored with the run as JSON:
`to_dict()` gives plain values, `from_dict()` rebuilds it and refuses unknown keys (a typo must not silently
fall back to a default; keys of retired fields, which runs stored before their removal hold, are dropped).
`engine_config()` maps it onto the PPOConfig the online engine and the memory estimate understand (same LoRA,
same lengths, the batch shapes this algorithm runs).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class TrainConfig:
    # ---- run length -------------------------------------------------------------------------------------
    steps: int = 50
    """Optimiser steps (each on one batch)."""

    # ---- optimiser --------------------------------------------------------------------------------------
    lr: float = 5e-5
    """AdamW learning rate of the LoRA parameters."""
    lr_schedule: str = "constant"
    """"constant" or "linear" (annealed linearly to 0 over `steps`)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Global gradient-norm clip over all trained parameters; 0 = off."""

    # ---- LoRA adapter of the policy ---------------------------------------------------------------------
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """peft target_modules: "all-linear" (every linear layer except the output head) or a list of names."""
    adapter_name: str = "policy"
    """Name of the trained adapter on `lm.model`; other adapters (e.g. a reward adapter) are kept."""

    # ---- lengths ----------------------------------------------------------------------------------------
    max_prompt_tokens: int = 256
    """Prompts longer than this (in tokens, after the chat template) are truncated from the left."""

    # ---- the engine's shortcuts (same math; engine/rollout.py, components/fused_lora.py) -------------------
    share_prompt_prefix: bool = True
    """Forward passes run the prompt prefix that all rows share (a chat template's system prompt) once and the
    rest of each row on its cache (components/training/engine/rollout.py); same math. False: every row in full."""
    fused_lora: bool = True
    """Training passes add the LoRA product inside the base layer's matrix multiply (components/fused_lora.py)
    instead of peft's separate scale and add; same weights and math. False: peft's own forward."""
    pack_rows: bool = True
    """Forward passes that do not share a prompt prefix (compiled training passes, prompts with no common prefix,
    the reference pass) run the rows packed one after another into a single sequence with no padding; attention
    stays inside each row (FlashAttention's variable-length kernel on CUDA in bf16/fp16, SDPA row by row
    elsewhere; components/attention.py). Same results; the padding to the longest prompt is not computed (with
    prompts of 16..64 tokens and 128-token responses, one position in eight). Only for decoders known to allow
    it (`rlhf_studio.components.attention.PACKABLE_MODEL_TYPES`; others keep padded rows); on CUDA or compiled, only where
    the one-kernel path passed its probe (the row-by-row fallback would cost a kernel launch per row). False:
    padded rows."""

    # ---- bookkeeping ------------------------------------------------------------------------------------
    seed: int = 0
    """Seeds the LoRA init, the data order and sampling."""
    checkpoint_every: int = 0
    """The job stores a resumable checkpoint every N steps (and always at the end); 0 = only at the end."""

    def __post_init__(self) -> None:
        self.validate()

    # subclasses: largest accepted value of each numeric field (far above anything useful on one machine, low
    # enough that a typo with extra zeros is refused with a message instead of allocating until the process dies)
    UPPER_BOUNDS: ClassVar[dict] = {
        "steps": 1_000_000, "lr": 1.0, "weight_decay": 10.0, "max_grad_norm": 1e6, "lora_r": 1024,
        "lora_alpha": 65536, "max_prompt_tokens": 32768, "seed": 2**63 - 1,
        "checkpoint_every": 1_000_000}

    def validate(self) -> None:
        for f in dataclasses.fields(self):        # types first: a string or NaN from a form must not slip through
            v = getattr(self, f.name)
            if f.type in ("int", int):
                need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be a whole number, got {v!r}")
            elif f.type in ("float", float):
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                     f"{f.name} must be a finite number, got {v!r}")
            elif f.type in ("bool", bool):
                need(isinstance(v, bool), f"{f.name} must be true or false, got {v!r}")
        for name, top in self.UPPER_BOUNDS.items():
            need(getattr(self, name) <= top, f"{name} must be at most {top:g}, got {getattr(self, name)!r}")
        need(self.steps >= 1, "steps must be >= 1")
        need(self.lr > 0, "lr must be > 0")
        need(self.lr_schedule in ("constant", "linear"), "lr_schedule must be 'constant' or 'linear'")
        need(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0")
        need(self.lora_r >= 1 and self.lora_alpha >= 1, "lora_r and lora_alpha must be >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(bool(self.adapter_name) and self.adapter_name.replace("_", "").replace("-", "").isalnum(),
             "adapter_name must be letters, digits, '-' or '_'")
        self.check()

    def check(self) -> None:
        """The algorithm's own rules (subclasses)."""

    def need_micro_batches(self, name: str) -> None:
        """Field `name` (the rows of one optimiser step) is >= 1 and splits into `grad_accum` micro-batches."""
        n, parts = getattr(self, name), getattr(self, "grad_accum", 1)
        need(n >= 1, f"{name} must be >= 1")
        need(parts >= 1 and n % parts == 0, f"{name} ({n}) must be a multiple of grad_accum ({parts})")

    def lr_at(self, step: int) -> float:
        return self.lr * max(0.0, 1.0 - step / self.steps) if self.lr_schedule == "linear" else self.lr

    def engine_config(self) -> "PPOConfig":  # noqa: F821 - components/training/ppo_config.py
        """The PPOConfig of the same LoRA, lengths and batch shape (for the engine and the memory estimate)."""
        raise NotImplementedError

    def _shared_engine_fields(self) -> dict:
        keep = ("lr", "lr_schedule", "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "adapter_name", "max_prompt_tokens", "share_prompt_prefix", "fused_lora",
                "pack_rows", "seed")
        return {k: getattr(self, k) for k in keep}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        json.dumps(d)  # JSON-safe by construction; fail loudly here rather than in storage
        return d

    # keys of fields removed from a config that runs stored before still hold (subclasses)
    RETIRED_KEYS: ClassVar[frozenset] = frozenset()

    @classmethod
    def from_dict(cls, d: dict):
        d = {k: v for k, v in d.items() if k not in cls.RETIRED_KEYS}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


@dataclass
class OnlineConfig(TrainConfig):
    """What the algorithms that sample and score share (PPO, RLOO, GRPO)."""
    # ---- batch shape --------------------------------------------------------------------------------------
    mini_batch_size: int = 8
    """Sequences per optimiser step; the step's sequences must be a multiple of it."""
    grad_accum: int = 1
    """Micro-batches per minibatch: the minibatch is split in `grad_accum` forward/backward passes before one
    optimiser step (memory knob, same maths). `mini_batch_size` must be a multiple of it."""

    # ---- sampling -----------------------------------------------------------------------------------------
    max_new_tokens: int = 48
    """Response length limit; responses that reach it without EOS get `missing_eos_penalty`."""
    temperature: float = 0.7
    """Sampling temperature. The same temperature divides the logits when log-probabilities are computed."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = off. (top-k is always off.) Log-probabilities are those of the untruncated,
    temperature-scaled distribution, as in TRL."""

    # ---- reward and KL ------------------------------------------------------------------------------------
    kl_coef: float = 0.05
    """beta: weight of the KL to the reference (where it enters is the algorithm's: see its module)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses that end without EOS (truncated at `max_new_tokens`). Off by
    default for PPO: the embedded model's everyday answers run longer than the few dozen new tokens a CPU run can
    afford, so nearly every rollout pays the penalty and the few that end early escape it; the penalty then
    teaches "stop early", whatever the labels asked. Turn it on when `max_new_tokens` covers the answers the
    labels judged (docs/LEARNING.md)."""
    score_clip: float = 0.0
    """Clip reward-model scores to [-score_clip, score_clip] before use; 0 = off."""
    cliprange: float = 0.2
    """Clip epsilon of the probability ratio to the sampling policy."""

    # ---- engine -------------------------------------------------------------------------------------------
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower); for large models on a GPU."""
    compile: str = "off"
    """torch.compile each decoder layer (and the log-probs from the head's logits) for the training passes:
    "on", "off", or "auto" (on for an unquantized base on CUDA). Fuses the elementwise work (norms, activations,
    rotary, LoRA adds, the fp32 log-softmax over the vocabulary) that keeps an eager LoRA step far from the GPU's
    peak. The first training pass pays the compilation; shapes are compiled dynamic, so micro-batches of other
    lengths reuse it. Training passes then run every row in full (the shared-prompt-prefix shortcut's cache does not compile); the
    rollout, policy and reference passes stay eager. Not with gradient_checkpointing. "off" by default: the first
    step's compilation pays off only after many steps (docs/GPU.md, "PPOConfig switches"). The first update
    checks that every trainable tensor got a gradient (a compiled graph once silently skipped attention's backward
    pass). Where compiling fails (no working C++ compiler or Triton, a GPU too old for Triton) or that check does,
    the mini-batch is redone eagerly before its step and the run goes on eagerly, saying why
    (`PPOTrainer.compile_fallback`; the run's notes in the studio)."""
    n_display_samples: int = 4
    """(prompt, response, reward) triples returned in each step's metrics for display."""

    UPPER_BOUNDS: ClassVar[dict] = {
        **TrainConfig.UPPER_BOUNDS, "mini_batch_size": 4096, "grad_accum": 4096, "max_new_tokens": 8192,
        "temperature": 10.0, "kl_coef": 100.0, "missing_eos_penalty": 1e4, "score_clip": 1e6, "cliprange": 10.0,
        "n_display_samples": 4096}

    def check(self) -> None:
        self.need_micro_batches("mini_batch_size")
        need(self.max_new_tokens >= 1, "token limits must be >= 1")
        need(self.temperature > 0, "temperature must be > 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.kl_coef >= 0, "kl_coef must be >= 0")
        need(self.missing_eos_penalty >= 0 and self.score_clip >= 0, "missing_eos_penalty and score_clip must be >= 0")
        need(self.cliprange > 0, "clip ranges must be > 0")
        need(self.compile in ("auto", "on", "off"), "compile must be auto, on or off")
        need(not (self.compile == "on" and self.gradient_checkpointing),
             "compile and gradient_checkpointing cannot be combined; turn one off")
        need(self.n_display_samples >= 0, "n_display_samples must be >= 0")


@dataclass
class OfflineConfig(TrainConfig):
    """What the algorithms that learn from labelled rows share (DPO, KTO)."""
    # ---- batch shape --------------------------------------------------------------------------------------
    batch_size: int = 8
    """Labelled rows (DPO: preference pairs) per optimiser step."""
    grad_accum: int = 1
    """Micro-batches per step (memory knob, same math); `batch_size` must be a multiple of it."""
    max_completion_tokens: int = 128
    """Completions longer than this (in tokens, EOS included) are cut."""

    # ---- the loss ------------------------------------------------------------------------------------------
    beta: float = 0.1
    """Strength of the pull towards the reference: larger = stay closer."""

    # ---- the engine ----------------------------------------------------------------------------------------
    cache_reference: bool = True
    """Keep each labelled row's reference log-prob sum (the base with the adapter off never changes during a run)
    and run the reference pass only on rows not seen before: from the second pass over the data on, a step runs
    no reference forward for its rows (KTO's mismatched rows, new each step, are still scored). Same numbers
    within float noise. Kept in memory only, not in checkpoints: a resumed run recomputes it. False: the
    reference pass scores every row every step."""

    UPPER_BOUNDS: ClassVar[dict] = {**TrainConfig.UPPER_BOUNDS, "batch_size": 4096, "grad_accum": 4096,
                                    "max_completion_tokens": 8192, "beta": 100.0}

    def check(self) -> None:
        self.need_micro_batches("batch_size")
        need(self.max_completion_tokens >= 1, "max_completion_tokens must be >= 1")
        need(self.beta > 0, "beta must be > 0")

    def engine_config(self) -> "PPOConfig":  # noqa: F821
        """The LoRA, lengths and one pass a step, in the engine's terms (for the memory estimate); the rows a
        pass scores: `scored_rows` (DPO scores a pair's two completions together)."""
        from .ppo_config import PPOConfig
        n = self.scored_rows()
        return PPOConfig(steps=self.steps, batch_size=n, mini_batch_size=n, grad_accum=self.grad_accum,
                         ppo_epochs=1, max_new_tokens=self.max_completion_tokens, merge_for_generation="off",
                         **self._shared_engine_fields())

    def scored_rows(self) -> int:
        return self.batch_size
