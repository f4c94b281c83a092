"""The settings every algorithm shares (adapter, optimiser, lengths, bookkeeping) and their checks.

    TrainConfig                 every algorithm: run length, optimiser, LoRA, prompt length, shortcuts, seed
      OnlineConfig              the sampling ones, and the online engine's own settings: batch shape,
                                sampling, reward shaping, clip, the engine's passes (compile, merged sampling, ...)
        PPOConfig (ppo_config.py), GroupConfig (group.py: RLOOConfig, GRPOConfig)
      OfflineConfig             the labelled ones: batch shape, completion length, beta (DPOConfig, KTOConfig)

Each algorithm's config subclasses one of them, adds its own fields, each documented (or overrides a default),
and is stored with the run as JSON:
`to_dict()` gives plain values, `from_dict()` rebuilds it and refuses unknown keys (a typo must not silently
fall back to a default; keys of retired fields, which runs stored before their removal hold, are dropped).
The online engine (engine/online.py) reads an OnlineConfig: its fields, and the two numbers each algorithm
names its own way (`samples_per_step()`, `epochs_per_step()`). `engine_config()` gives the PPOConfig of the same
LoRA, lengths and batch shapes, which the memory estimate (memory.py) reads.
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
    it (`rlhf_studio.components.attention.PACKABLE_MODEL_TYPES`; others keep padded rows); on CUDA or compiled,
    only where the one-kernel path passed its probe (the row-by-row fallback would cost a kernel launch per row).
    False: padded rows."""
    tree_rows: bool = True
    """On the CPU, forward passes run the rows as a prompt tree: the shared prompt prefix and each distinct
    prompt once (k completions of one prompt, a pair's two completions), no padding, one sequence
    (components/training/engine/tree.py); same results. Only for the decoders `pack_rows` allows and not with
    compiled passes; GPUs keep the layouts above. False: the layouts above on the CPU too."""

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
        """The PPOConfig of the same LoRA, lengths and batch shape (what the memory estimate reads)."""
        raise NotImplementedError

    def _shared_engine_fields(self) -> dict:
        keep = ("lr", "lr_schedule", "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "adapter_name", "max_prompt_tokens", "share_prompt_prefix", "fused_lora",
                "pack_rows", "tree_rows", "seed")
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
    """What the algorithms that sample and score share (PPO, RLOO, GRPO): the online engine's settings."""
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
    old_logprobs: str = "auto"
    """Where the rollout's log-probs (and PPO's values) come from. "forward": one no-grad forward of the policy
    over prompt + response after sampling (bit-for-bit the computation the first training pass repeats).
    "generation": the final hidden states recorded while sampling (KV-cached), through the output and value
    heads: no second trunk forward; equal to "forward" to float rounding in fp32, noisier in bf16/fp16 (the
    first ratio to the sampling policy is then not exactly 1). "auto": "generation" for an fp32 base, else
    "forward"."""
    merge_for_generation: str = "auto"
    """Sample with the LoRA delta merged into the base weights (restored exactly after sampling, so nothing
    drifts): one matmul per linear layer instead of the base matmul plus peft's LoRA ops. The old log-probs
    always come from the unmerged policy, so the ratio to the sampling policy is exact either way; what merging
    changes is the sampling distribution,
    by the rounding of base + delta to the base dtype. "auto" = an unquantized fp32 base (rounding only), or
    any unquantized base on CUDA (faster decoding; the drift is of the size of running the policy in bf16 at all:
    docs/GPU.md, "PPOConfig switches"); "on" = also bf16/fp16 on the CPU; "off" = never (samples exactly the
    unmerged policy). Never for 4/8-bit bases."""

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
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in the OpenAI/Huang et al. implementation, not PyTorch's 1e-8)."""
    lora_precision: str = "auto"
    """Where peft keeps fp32 adapters on a bf16/fp16 base: "fp32" computes the LoRA term in fp32 (peft's math);
    "half" runs the LoRA matmuls in the base's dtype with the adapter weights rounded to it (fp32 accumulation,
    as under bf16 autocast; the adapters, their gradients and AdamW stay fp32), which spares the fp32 casts of
    every LoRA layer's input, output and gradient; "auto" = "half" for a bf16 base on CUDA (fp16's narrow range
    would want loss scaling), else "fp32". Applies to the fused passes (`fused_lora`): the policy pass that gives
    the old log-probs and the training passes alike, so the first ratio to the sampling policy compares like with
    like. No effect on an fp32 base. The gradients sit as near peft's fp32 LoRA math as bf16 autocast's do
    (tests/test_ppo_speedups.py); what it saves: docs/GPU.md, "PPOConfig switches"."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower); for large models on a GPU."""
    compile: str = "off"
    """torch.compile each decoder layer (and the log-probs from the head's logits) for the training passes: "on", "off",
    or "auto" (on for an unquantized base on CUDA). Fuses the elementwise work (norms, activations, rotary, LoRA adds,
    the fp32 log-softmax over the vocabulary) that keeps an eager LoRA step far from the GPU's peak. The first training
    pass pays the compilation; shapes are compiled dynamic, so micro-batches of other lengths reuse it. Training passes
    then run every row in full (the shared-prompt-prefix shortcut's cache does not compile); the rollout, policy and
    reference passes stay eager. Not with gradient_checkpointing. "off" by default: the first step's compilation pays
    off only after many steps (docs/GPU.md, "PPOConfig switches"). The first update checks that every trainable tensor
    got a gradient (a compiled graph once silently skipped attention's backward pass). Where compiling fails (no working
    C++ compiler or Triton, a GPU too old for Triton) or that check does, the mini-batch is redone eagerly before its
    step and the run goes on eagerly, saying why (`PPOTrainer.compile_fallback`; the run's notes in the studio)."""
    compile_backend: str = "inductor"
    """The torch.compile backend of `compile` (any name torch._dynamo knows: "aot_eager" traces without generating
    kernels; the tests register a recording backend)."""
    n_display_samples: int = 4
    """(prompt, response, reward) triples returned in each step's metrics for display."""

    UPPER_BOUNDS: ClassVar[dict] = {
        **TrainConfig.UPPER_BOUNDS, "mini_batch_size": 4096, "grad_accum": 4096, "max_new_tokens": 8192,
        "temperature": 10.0, "kl_coef": 100.0, "missing_eos_penalty": 1e4, "score_clip": 1e6, "cliprange": 10.0,
        "adam_eps": 1.0, "n_display_samples": 4096}

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
        need(self.adam_eps > 0, "adam_eps must be > 0")
        need(self.merge_for_generation in ("auto", "on", "off"), "merge_for_generation must be auto, on or off")
        need(self.lora_precision in ("auto", "fp32", "half"), "lora_precision must be auto, fp32 or half")
        need(self.old_logprobs in ("auto", "forward", "generation"),
             "old_logprobs must be auto, forward or generation")

    # ---- what each algorithm names its own way ------------------------------------------------------------
    def samples_per_step(self) -> int:
        """Sequences sampled (and scored) per step (subclasses)."""
        raise NotImplementedError

    def epochs_per_step(self) -> int:
        """Passes of the update over each step's sequences (subclasses)."""
        raise NotImplementedError

    # ---- the engine's decisions for a base and device -------------------------------------------------------
    def merges_for_sampling(self, quantized: bool, base_fp32: bool, device_type: str) -> bool:
        """Whether rollouts sample with the LoRA merged (`merge_for_generation`, for this base and device)."""
        if quantized:
            return False
        return self.merge_for_generation == "on" or (
            self.merge_for_generation == "auto" and (base_fp32 or device_type == "cuda"))

    def compiles(self, device_type: str, quantized: bool) -> bool:
        """Whether the training passes run through compiled decoder layers (`compile`, for this base and device)."""
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda" and not quantized
                                        and not self.gradient_checkpointing)

    def half_lora(self, device_type: str, base_bf16: bool) -> bool:
        """Whether the fused passes run fp32 adapters' matmuls in the half-precision base's dtype."""
        return self.lora_precision == "half" or (self.lora_precision == "auto" and device_type == "cuda" and base_bf16)

    def engine_config(self) -> "PPOConfig":  # noqa: F821
        """The PPOConfig of the same settings and batch shape, without a critic (what the memory estimate reads)."""
        from .ppo_config import PPOConfig
        online = {f.name: getattr(self, f.name) for f in dataclasses.fields(OnlineConfig)}
        return PPOConfig(**online, batch_size=self.samples_per_step(), ppo_epochs=self.epochs_per_step(),
                         vf_coef=0.0, value_head_init="zeros")


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
