"""PPOConfig: every knob of one PPO run, documented field by field.

The config is stored with the run, so it must round-trip through JSON: `to_dict()` gives plain Python values and
`from_dict()` rebuilds it (unknown keys are rejected so that a typo does not silently fall back to a default;
keys of retired fields, which runs stored before their removal hold, are dropped).
The defaults follow "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) where they apply,
scaled down to what a laptop can run.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass


# Fields removed from PPOConfig that configs stored with earlier runs (and their checkpoints) still hold; none
# changed the math, so a stored run resumes without them. stack_sibling_bases: one base matmul for q/k/v and
# gate/up in compiled passes, slower on a GPU and a CPU alike (docs/GPU.md, run 12).
RETIRED_KEYS = frozenset({"stack_sibling_bases"})


@dataclass
class PPOConfig:
    # ---- run length and batch shape -------------------------------------------------------------------
    steps: int = 100
    """PPO iterations (each = one rollout of `batch_size` prompts + `ppo_epochs` passes of optimisation)."""
    batch_size: int = 8
    """Prompts sampled per step (one response each)."""
    mini_batch_size: int = 8
    """Sequences per optimiser step; `batch_size` must be a multiple of it."""
    grad_accum: int = 1
    """Micro-batches per minibatch: the minibatch is split in `grad_accum` forward/backward passes before one
    optimiser step (memory knob, same maths). `mini_batch_size` must be a multiple of it."""
    ppo_epochs: int = 4
    """Passes over the rollout batch, each over freshly shuffled minibatches."""

    # ---- sampling ----------------------------------------------------------------------------------------
    max_new_tokens: int = 48
    """Response length limit; responses that reach it without EOS get `missing_eos_penalty`."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (in tokens, after the chat template) are truncated from the left."""
    temperature: float = 0.7
    """Sampling temperature. The same temperature divides the logits when log-probabilities are computed."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = off. (top-k is always off.) Log-probabilities are those of the untruncated,
    temperature-scaled distribution, as in TRL."""
    old_logprobs: str = "auto"
    """Where the rollout's log-probs and values come from. "forward": one no-grad forward of the policy over
    prompt + response after sampling (bit-for-bit the computation the first training pass repeats).
    "generation": the final hidden states recorded while sampling (KV-cached), through the output and value
    heads: no second trunk forward; equal to "forward" to float rounding in fp32, noisier in bf16/fp16 (the
    first PPO ratio is then not exactly 1). "auto": "generation" for an fp32 base, else "forward"."""
    merge_for_generation: str = "auto"
    """Sample with the LoRA delta merged into the base weights (restored exactly after sampling, so nothing
    drifts): one matmul per linear layer instead of the base matmul plus peft's LoRA ops. The old log-probs
    always come from the unmerged policy, so the PPO ratio is exact either way; what merging changes is the
    sampling distribution,
    by the rounding of base + delta to the base dtype. "auto" = an unquantized fp32 base (rounding only), or
    any unquantized base on CUDA (faster decoding; the drift is of the size of running the policy in bf16 at all:
    docs/GPU.md, "PPOConfig switches"); "on" = also bf16/fp16 on the CPU; "off" = never (samples exactly the
    unmerged policy). Never for 4/8-bit bases."""

    # ---- optimiser -----------------------------------------------------------------------------------------
    lr: float = 1e-4
    """AdamW learning rate of the LoRA and value-head parameters."""
    lr_schedule: str = "constant"
    """"constant" or "linear" (annealed linearly to 0 over `steps`)."""
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in the OpenAI/Huang et al. implementation, not PyTorch's 1e-8)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Global gradient-norm clip over all trained parameters; 0 = off."""

    # ---- LoRA adapter of the policy --------------------------------------------------------------------------
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    """0 keeps dropout off, so the log-probabilities of the rollout and of the first training pass agree."""
    target_modules: str | list[str] = "all-linear"
    """peft target_modules: "all-linear" (every linear layer except the output head) or a list of names."""
    adapter_name: str = "policy"
    """Name of the policy adapter on `lm.model`; other adapters (e.g. a reward adapter) are kept."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower); for large models on a GPU."""
    share_prompt_prefix: bool = True
    """Forward passes run the prompt prefix that all rows share (a chat template's system prompt) once and the
    rest of each row on its cache (components/ppo/rollout.py); same math. False: every row in full."""
    fused_lora: bool = True
    """Training passes add the LoRA product inside the base layer's matrix multiply (components/fused_lora.py)
    instead of peft's separate scale and add; same weights and math. False: peft's own forward."""
    lora_precision: str = "auto"
    """Where peft keeps fp32 adapters on a bf16/fp16 base: "fp32" computes the LoRA term in fp32 (peft's math);
    "half" runs the LoRA matmuls in the base's dtype with the adapter weights rounded to it (fp32 accumulation,
    as under bf16 autocast; the adapters, their gradients and AdamW stay fp32), which spares the fp32 casts of
    every LoRA layer's input, output and gradient; "auto" = "half" for a bf16 base on CUDA (fp16's narrow range
    would want loss scaling), else "fp32". Applies to the fused passes (`fused_lora`): the policy pass that gives
    the old log-probs and the training passes alike, so the first PPO ratio compares like with like. No effect on
    an fp32 base. The gradients sit as near peft's fp32 LoRA math as bf16 autocast's do
    (tests/test_ppo_speedups.py); what it saves: docs/GPU.md, "PPOConfig switches"."""
    compile: str = "off"
    """torch.compile each decoder layer (and the log-probs from the head's logits) for the training passes:
    "on", "off", or "auto" (on for an unquantized base on CUDA). Fuses the elementwise work (norms, activations,
    rotary, LoRA adds, the fp32 log-softmax over the vocabulary) that keeps an eager LoRA step far from the GPU's
    peak. The first training pass pays the compilation; shapes are compiled dynamic, so micro-batches of other lengths reuse it.
    Training passes then run every row in full (the shared-prompt-prefix shortcut's cache does not compile); the
    rollout, policy and reference passes stay eager. Not with gradient_checkpointing. "off" by default: the first
    step's compilation pays off only after many steps (docs/GPU.md, "PPOConfig switches"). The first update
    checks that every trainable tensor got a gradient (a compiled graph once silently skipped attention's backward
    pass). Where compiling fails (no working C++ compiler or Triton, a GPU too old for Triton) or that check does,
    the mini-batch is redone eagerly before its step and the run goes on eagerly, saying why
    (`PPOTrainer.compile_fallback`; the run's notes in the studio)."""
    pack_rows: bool = True
    """Forward passes that do not share a prompt prefix (compiled training passes, prompts with no common prefix,
    the reference pass) run the rows packed one after another into a single sequence with no padding; attention
    stays inside each row (FlashAttention's variable-length kernel on CUDA in bf16/fp16, SDPA row by row
    elsewhere; components/attention.py). Same results; the padding to the longest prompt is not computed (with
    prompts of 16..64 tokens and 128-token responses, one position in eight). Only for decoders known to allow
    it (`components.attention.PACKABLE_MODEL_TYPES`; others keep padded rows); on CUDA or compiled, only where
    the one-kernel path passed its probe (the row-by-row fallback would cost a kernel launch per row). False:
    padded rows."""
    compile_backend: str = "inductor"
    """The torch.compile backend of `compile` (any name torch._dynamo knows: "aot_eager" traces without generating
    kernels; the tests register a recording backend)."""

    # ---- reward shaping and KL penalty -------------------------------------------------------------------
    kl_coef: float = 0.05
    """beta: per-token reward -beta * (log pi(a|s) - log pi_ref(a|s)). Start value when `adaptive_kl`."""
    adaptive_kl: bool = False
    """Adapt beta towards `kl_target` (Ziegler et al. 2019 proportional controller)."""
    kl_target: float = 6.0
    """Target sequence-level KL (nats, summed over response tokens) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller: larger = slower adaptation."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses that end without EOS (truncated at `max_new_tokens`). Off by
    default: the embedded model's everyday answers run longer than the few dozen new tokens a CPU run can afford,
    so nearly every rollout pays the penalty and the few that end early escape it; the penalty then teaches
    "stop early", whatever the labels asked. Turn it on when `max_new_tokens` covers the answers the labels
    judged (docs/LEARNING.md)."""
    score_clip: float = 0.0
    """Clip reward-model scores to [-score_clip, score_clip] before use; 0 = off."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (scale only, the mean is kept) over the batch before GAE."""

    # ---- advantage estimation -------------------------------------------------------------------------------
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""

    # ---- losses --------------------------------------------------------------------------------------------------
    cliprange: float = 0.2
    """PPO ratio clip epsilon of the policy loss."""
    cliprange_value: float = 0.2
    """Clip of the value prediction around its rollout value in the value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (value head shares the policy trunk)."""
    ent_coef: float = 0.0
    """Entropy bonus weight (0 = off; the entropy is still reported)."""

    # ---- value head -------------------------------------------------------------------------------------------
    value_head_init: str = "reward"
    """"reward": start the value head from the reward head's weights when the reward function provides them
    (`reward_fn.value_head_init()`), else zeros. "zeros": weight and bias 0."""

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    seed: int = 0
    """Seeds prompt order, minibatch shuffling and sampling."""
    checkpoint_every: int = 0
    """`PPOTrainer.train` hands a `state_bytes()` checkpoint to its callback every N steps; 0 = never."""
    n_display_samples: int = 4
    """(prompt, response, reward) triples returned in each step's metrics for display."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        # Types first: a string or NaN from a form must not slip through a comparison.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be a whole number, got {v!r}")
            elif f.type in ("float", float):
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                     f"{f.name} must be a finite number, got {v!r}")
            elif f.type in ("bool", bool):
                need(isinstance(v, bool), f"{f.name} must be true or false, got {v!r}")
        # Upper bounds: far above anything useful on one machine, low enough that a typo (an extra zero or
        # three) is refused with a message instead of allocating until the process dies.
        for name, top in _UPPER_BOUNDS.items():
            need(getattr(self, name) <= top, f"{name} must be at most {top:g}, got {getattr(self, name)!r}")
        need(self.steps >= 1, "steps must be >= 1")
        need(self.batch_size >= 1 and self.mini_batch_size >= 1, "batch sizes must be >= 1")
        need(self.batch_size % self.mini_batch_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        need(self.grad_accum >= 1 and self.mini_batch_size % self.grad_accum == 0,
             f"mini_batch_size ({self.mini_batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        need(self.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        need(self.max_new_tokens >= 1 and self.max_prompt_tokens >= 1, "token limits must be >= 1")
        need(self.temperature > 0, "temperature must be > 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.lr > 0, "lr must be > 0")
        need(self.lr_schedule in ("constant", "linear"), "lr_schedule must be 'constant' or 'linear'")
        need(self.lora_r >= 1, "lora_r must be >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        need(self.kl_coef >= 0, "kl_coef must be >= 0")
        need(self.kl_target > 0 and self.kl_horizon > 0, "kl_target and kl_horizon must be > 0")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        need(self.cliprange > 0 and self.cliprange_value > 0, "clip ranges must be > 0")
        need(self.checkpoint_every >= 0 and self.n_display_samples >= 0, "checkpoint_every and n_display_samples must be >= 0")
        need(self.adam_eps > 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0,
             "adam_eps must be > 0; weight_decay and max_grad_norm >= 0")
        need(self.lora_alpha >= 1, "lora_alpha must be >= 1")
        need(self.missing_eos_penalty >= 0 and self.score_clip >= 0, "missing_eos_penalty and score_clip must be >= 0")
        need(self.vf_coef >= 0 and self.ent_coef >= 0, "vf_coef and ent_coef must be >= 0")
        need(self.value_head_init in ("reward", "zeros"), "value_head_init must be 'reward' or 'zeros'")
        need(self.merge_for_generation in ("auto", "on", "off"), "merge_for_generation must be auto, on or off")
        need(self.compile in ("auto", "on", "off"), "compile must be auto, on or off")
        need(self.lora_precision in ("auto", "fp32", "half"), "lora_precision must be auto, fp32 or half")
        need(not (self.compile == "on" and self.gradient_checkpointing),
             "compile and gradient_checkpointing cannot be combined; turn one off")
        need(self.old_logprobs in ("auto", "forward", "generation"),
             "old_logprobs must be auto, forward or generation")
        need(bool(self.adapter_name) and self.adapter_name.replace("_", "").replace("-", "").isalnum(),
             "adapter_name must be letters, digits, '-' or '_'")

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        json.dumps(d)  # JSON-safe by construction; fail loudly here rather than in storage
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PPOConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in RETIRED_KEYS}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PPO config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "PPOConfig":
        return cls.from_dict(json.loads(s))


# Largest accepted value of each numeric field (see PPOConfig.validate).
_UPPER_BOUNDS = {
    "steps": 1_000_000, "batch_size": 4096, "mini_batch_size": 4096, "grad_accum": 4096, "ppo_epochs": 100,
    "max_new_tokens": 8192, "max_prompt_tokens": 32768, "temperature": 10.0, "lr": 1.0, "adam_eps": 1.0,
    "weight_decay": 10.0, "max_grad_norm": 1e6, "lora_r": 1024, "lora_alpha": 65536, "kl_coef": 100.0,
    "kl_target": 1e4, "kl_horizon": 10**9, "missing_eos_penalty": 1e4, "score_clip": 1e6,
    "cliprange": 10.0, "cliprange_value": 1e4, "vf_coef": 1e3, "ent_coef": 100.0, "seed": 2**63 - 1,
    "checkpoint_every": 1_000_000, "n_display_samples": 4096,
}
