"""The embedded model cut to its first decoder layers, for tests of mechanics that hold layer by layer; and a
policy adapter that is not the identity."""
from __future__ import annotations


def keep_first_layers(lm, n: int):
    """Keep only the first `n` decoder layers of a loaded model (real weights; embeddings, final norm and output
    head unchanged) and return it. For tests whose claims do not depend on depth (a checkpoint resumes
    identically, compiled passes equal eager ones, packed rows equal padded rows): each layer costs the same, and
    on a CPU six of SmolLM2's thirty cut a training step to about a third (the 49152-token output head stays)."""
    from rlhf_studio.components.model_utils import causal_lm_of
    decoder = causal_lm_of(lm.model).get_decoder()
    decoder.layers = decoder.layers[:n]
    lm.model.config.num_hidden_layers = n
    return lm


def attach_moved_policy(lm, lora_r: int = 8, lora_alpha: int = 16, adapter_name: str = "policy",
                        std: float = 0.02):
    """Attach the trainers' policy LoRA adapter with non-zero B (normal, `std`; a fresh adapter's B is 0: the
    policy would be the base, and a test comparing two layouts of the LoRA math would compare nothing), trainable,
    the same on every run. Returns lm (lm.model is then the peft model)."""
    import torch

    from rlhf_studio.components.training.engine.adapter import attach_policy_adapter
    from rlhf_studio.components.training.ppo_config import PPOConfig
    torch.manual_seed(0)        # peft draws lora_A from the global generator: the same adapter in any test order
    attach_policy_adapter(lm, PPOConfig(lora_r=lora_r, lora_alpha=lora_alpha, adapter_name=adapter_name))
    g = torch.Generator().manual_seed(0)
    for name, p in lm.model.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g) * std)
            p.requires_grad_(True)
    return lm
