"""PPOConfig: every knob of one PPO run, documented field by field (the fields every algorithm shares, and those
of the sampling algorithms, are components/training/config.py's TrainConfig and OnlineConfig).

The config is stored with the run, so it must round-trip through JSON: `to_dict()` gives plain Python values and
`from_dict()` rebuilds it (unknown keys are rejected so that a typo does not silently fall back to a default;
keys of retired fields, which runs stored before their removal hold, are dropped). It is also the online
engine's config: RLOO and GRPO map theirs onto it (`engine_config()`).
The defaults follow "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) where they apply,
scaled down to what a laptop can run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import OnlineConfig, need


@dataclass
class PPOConfig(OnlineConfig):
    # ---- run length and batch shape -------------------------------------------------------------------
    steps: int = 100
    """PPO iterations (each = one rollout of `batch_size` prompts + `ppo_epochs` passes of optimisation)."""
    batch_size: int = 8
    """Prompts sampled per step (one response each)."""
    ppo_epochs: int = 4
    """Passes over the rollout batch, each over freshly shuffled minibatches."""

    # ---- sampling ----------------------------------------------------------------------------------------
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
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in the OpenAI/Huang et al. implementation, not PyTorch's 1e-8)."""

    # ---- LoRA adapter of the policy --------------------------------------------------------------------------
    lora_precision: str = "auto"
    """Where peft keeps fp32 adapters on a bf16/fp16 base: "fp32" computes the LoRA term in fp32 (peft's math);
    "half" runs the LoRA matmuls in the base's dtype with the adapter weights rounded to it (fp32 accumulation,
    as under bf16 autocast; the adapters, their gradients and AdamW stay fp32), which spares the fp32 casts of
    every LoRA layer's input, output and gradient; "auto" = "half" for a bf16 base on CUDA (fp16's narrow range
    would want loss scaling), else "fp32". Applies to the fused passes (`fused_lora`): the policy pass that gives
    the old log-probs and the training passes alike, so the first PPO ratio compares like with like. No effect on
    an fp32 base. The gradients sit as near peft's fp32 LoRA math as bf16 autocast's do
    (tests/test_ppo_speedups.py); what it saves: docs/GPU.md, "PPOConfig switches"."""
    compile_backend: str = "inductor"
    """The torch.compile backend of `compile` (any name torch._dynamo knows: "aot_eager" traces without generating
    kernels; the tests register a recording backend)."""

    # ---- reward shaping and KL penalty -------------------------------------------------------------------
    adaptive_kl: bool = False
    """Adapt beta towards `kl_target` (Ziegler et al. 2019 proportional controller)."""
    kl_target: float = 6.0
    """Target sequence-level KL (nats, summed over response tokens) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller: larger = slower adaptation."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (scale only, the mean is kept) over the batch before GAE."""

    # ---- advantage estimation -------------------------------------------------------------------------------
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""

    # ---- losses --------------------------------------------------------------------------------------------------
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

    # Fields removed from PPOConfig that configs stored with earlier runs (and their checkpoints) still hold;
    # none changed the math, so a stored run resumes without them. stack_sibling_bases: one base matmul for
    # q/k/v and gate/up in compiled passes, slower on a GPU and a CPU alike (docs/GPU.md, run 12).
    RETIRED_KEYS: ClassVar[frozenset] = frozenset({"stack_sibling_bases"})
    UPPER_BOUNDS: ClassVar[dict] = {
        **OnlineConfig.UPPER_BOUNDS, "batch_size": 4096, "ppo_epochs": 100, "adam_eps": 1.0, "kl_target": 1e4,
        "kl_horizon": 10**9, "cliprange_value": 1e4, "vf_coef": 1e3, "ent_coef": 100.0}

    def check(self) -> None:
        super().check()
        need(self.batch_size >= 1, "batch sizes must be >= 1")
        need(self.batch_size % self.mini_batch_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        need(self.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        need(self.kl_target > 0 and self.kl_horizon > 0, "kl_target and kl_horizon must be > 0")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        need(self.cliprange_value > 0, "clip ranges must be > 0")
        need(self.adam_eps > 0, "adam_eps must be > 0")
        need(self.vf_coef >= 0 and self.ent_coef >= 0, "vf_coef and ent_coef must be >= 0")
        need(self.value_head_init in ("reward", "zeros"), "value_head_init must be 'reward' or 'zeros'")
        need(self.merge_for_generation in ("auto", "on", "off"), "merge_for_generation must be auto, on or off")
        need(self.lora_precision in ("auto", "fp32", "half"), "lora_precision must be auto, fp32 or half")
        need(self.old_logprobs in ("auto", "forward", "generation"),
             "old_logprobs must be auto, forward or generation")

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
