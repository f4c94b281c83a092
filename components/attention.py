"""Attention kernels for passes that are differentiated (PPO updates, the deep reward tier).

Seen on an H200 (torch 2.11, CUDA 13, bf16, LoRA on a SmolLM2-135M shape, 64 left-padded prompts x 128 tokens):
with PyTorch choosing cuDNN's fused attention for the masked SDPA call, the backward pass gave NaN gradients, and
after the first optimizer step every log-prob of the next epoch was NaN. The same step with cuDNN attention off
(PyTorch then runs its memory-efficient kernel; flash attention takes no mask) was finite.
`bench/gpu_nan_probe.py` reproduces it and prints which setting fails.
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def avoid_cudnn_attention(device) -> bool:
    """Turn cuDNN's SDPA kernel off for this process when training on CUDA; True if it was on.

    Process-wide on purpose: sdpa_kernel() blocks change the same global flags, and two trainers in two threads
    entering and leaving such blocks would restore each other's settings. Forward-only passes lose little: the
    memory-efficient kernel serves them.
    """
    if torch.device(device).type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("cuDNN attention turned off for training (NaN gradients with padding masks; components/attention.py)")
    return True


# ----------------------------------------------------------------------------------------------------------
# Packed rows: several sequences in one row, no padding
# ----------------------------------------------------------------------------------------------------------
# A training batch laid out [B, P + R] pads every row to the longest prompt; with prompts of 16..64 tokens and
# 128-token responses one position in eight is padding, which the matrix products compute like any other.
# Packed, the rows' real tokens follow each other in one sequence [1, T]; position ids restart at each row and
# attention stays inside each row (causal), given by cumulative row starts `cu_seqlens` [B + 1] (int32).
# transformers calls the attention function registered under PACKED with the decoder's extra keyword arguments,
# and makes no mask for an implementation name it has no mask function for.

PACKED = "studio_packed"
_registered = False


def _varlen_keywords() -> dict | None:
    """Keyword arguments that make torch's flash varlen_attn causal, None where it is missing. Its causal switch
    moved: is_causal=True (torch 2.10), window_size=(-1, 0) (later)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    kw["gqa"], kw["scale"] = "enable_gqa" in params, "scale" in params
    return kw


_VARLEN = _varlen_keywords()


def varlen_available(device, dtype) -> bool:
    """Packed attention runs as one flash kernel here (CUDA, half precision, torch's varlen_attn)."""
    return _VARLEN is not None and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def packed_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                             scaling: float | None = None, packed_cu_seqlens=None, packed_max_len=None, **kwargs):
    """transformers attention function for packed rows. query [1, Hq, T, D], key/value [1, Hkv, T, D] ->
    ([1, T, Hq, D], None). packed_cu_seqlens [B + 1] int32, packed_max_len: the longest row."""
    if packed_cu_seqlens is None or attention_mask is not None or dropout or kwargs.get("softcap") \
            or (kwargs.get("sliding_window") or packed_max_len) < packed_max_len:
        raise ValueError("packed attention needs packed_cu_seqlens, and takes no mask, dropout, softcap nor "
                         "sliding window shorter than a row; turn packing off (PPOConfig.pack_rows=False)")
    gqa = query.shape[1] != key.shape[1]
    if varlen_available(query.device, query.dtype):
        from torch.nn.attention.varlen import varlen_attn
        kw = {k: v for k, v in _VARLEN.items() if k not in ("gqa", "scale")}
        if scaling is not None and _VARLEN["scale"]:
            kw["scale"] = scaling
        elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6:
            raise ValueError(f"this torch's varlen_attn takes no scale, and the model's is {scaling}")
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))                 # [T, H, D]
        if gqa and _VARLEN["gqa"]:
            kw["enable_gqa"] = True
        elif gqa:
            k, v = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (k, v))
        out = varlen_attn(q, k, v, packed_cu_seqlens, packed_cu_seqlens, packed_max_len, packed_max_len, **kw)
        return out.unsqueeze(0), None
    # elsewhere (CPU): SDPA row by row; the host reads the row starts (cheap off the GPU)
    bounds = packed_cu_seqlens.tolist()
    rows = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None


# decoders whose attention transformers runs through its attention interface with rotary positions, causal and
# with no bias, softcap or alibi: packing gives their padded pass's results (tests/test_ppo_speedups.py runs llama)
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite", "phi3")


def packing_supported(config, longest_row: int) -> bool:
    """Can this decoder run packed rows of up to `longest_row` tokens (`packed_attention_forward`)?"""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return config.model_type in PACKABLE_MODEL_TYPES and (window is None or window >= longest_row)


def register_packed_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(PACKED, packed_attention_forward)
        _registered = True


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Within the block, the model whose (decoder's) config this is calls attention implementation `name`."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before
