"""Small helpers over a loaded causal LM and its saved weights, shared by generation, rewards and PPO."""
from __future__ import annotations

import json
import struct

import torch

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024   # safetensors' own limit on the JSON header


def causal_lm_of(model) -> torch.nn.Module:
    """The transformers CausalLM inside a peft PeftModel (LoRA layers are injected in it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    """A peft model whose adapters can be switched and disabled (`peft_config`, `disable_adapter()`)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0.. counted over the real tokens only (left padding gets 0s), so a left-padded row sees the same
    positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def safetensors_metadata(blob: bytes) -> dict:
    """The __metadata__ of a safetensors blob (header = 8-byte little-endian length + JSON); ValueError when the
    blob cannot be one."""
    if len(blob) < 8:
        raise ValueError("not a safetensors blob (too short)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n == 0 or n > len(blob) - 8 or n > MAX_SAFETENSORS_HEADER:
        raise ValueError("not a safetensors blob (bad header length)")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    return header.get("__metadata__") or {}
