"""Attention for passes that are differentiated (PPO updates, the deep reward tier): cuDNN's kernel off on CUDA
(below), and packed rows without padding (second half of the module).

Seen on an H200 (torch 2.11, CUDA 13, bf16, LoRA on a SmolLM2-135M shape, 64 left-padded prompts x 128 tokens):
with PyTorch choosing cuDNN's fused attention for the masked SDPA call, the backward pass gave NaN gradients, and
after the first optimizer step every log-prob of the next epoch was NaN. The same step with cuDNN attention off
(PyTorch then runs its memory-efficient kernel; flash attention takes no mask) was finite.
The probe that found it is described in docs/GPU.md ("Retired probes").
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


def _varlen_parameters() -> frozenset | None:
    """The parameter names of torch's flash varlen_attn, None where it is missing. Its signature moves between
    versions: causal is is_causal=True in torch 2.10, window_size=(-1, 0) later; scale and enable_gqa came later."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN = _varlen_parameters()


_VARLEN_WORKS: dict[str, bool] = {}       # device -> did the probe pass (`varlen_available`)


def varlen_available(device, dtype) -> bool:
    """Packed attention runs as one flash kernel here: CUDA, half precision, torch's varlen_attn, and on this
    device a small probe of it (forward and backward) agreed with SDPA row by row. Probed once per device."""
    device = torch.device(device)
    if _VARLEN is None or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if str(device) not in _VARLEN_WORKS:
        _VARLEN_WORKS[str(device)] = _probe_varlen(device)
    return _VARLEN_WORKS[str(device)]


@torch.enable_grad()          # the first packed pass may be a no-grad one; the probe needs the backward
def _probe_varlen(device) -> bool:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 11, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    try:
        fast = _varlen_rows(q, k, v, cu, 7, None)
        (gq,) = torch.autograd.grad(fast.float().square().sum(), q)
    except Exception as e:  # noqa: BLE001 - any failure means: keep padded rows
        log.warning("packed rows: torch's varlen_attn failed a probe on %s (%s: %s); passes keep padded rows",
                    device, type(e).__name__, e)
        return False
    slow = _sdpa_rows(q, k, v, cu, None)
    (gq_slow,) = torch.autograd.grad(slow.float().square().sum(), q)
    ok = bool((fast - slow).abs().max() < 3e-2 and (gq - gq_slow).abs().max() < 3e-2 * gq_slow.abs().max())
    if not ok:
        log.warning("packed rows: torch's varlen_attn disagreed with SDPA on %s; passes keep padded rows", device)
    return ok


def _varlen_rows(query, key, value, cu_seqlens, max_len, scaling):
    """[1, H, T, D] rows packed along T -> [1, T, Hq, D], with FlashAttention's variable-length kernel."""
    from torch.nn.attention.varlen import varlen_attn
    kw = {"window_size": (-1, 0)} if "window_size" in _VARLEN else {"is_causal": True}
    if scaling is not None and "scale" in _VARLEN:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"this torch's varlen_attn takes no scale, and the model's is {scaling}")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))      # [T, H, D]
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in _VARLEN:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw).unsqueeze(0)


def _sdpa_rows(query, key, value, cu_seqlens, scaling):
    """The same with SDPA row by row; the host reads the row starts (cheap off the GPU, a wait on it)."""
    bounds = cu_seqlens.tolist()
    rows = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1]) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous()


def packed_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                             scaling: float | None = None, packed_cu_seqlens=None, packed_max_len=None, **kwargs):
    """transformers attention function for packed rows. query [1, Hq, T, D], key/value [1, Hkv, T, D] ->
    ([1, T, Hq, D], None). packed_cu_seqlens [B + 1] int32, packed_max_len: the longest row."""
    if packed_cu_seqlens is None or attention_mask is not None or dropout or kwargs.get("softcap") \
            or (kwargs.get("sliding_window") or packed_max_len) < packed_max_len:
        raise ValueError("packed attention needs packed_cu_seqlens, and takes no mask, dropout, softcap nor "
                         "sliding window shorter than a row; turn packing off (PPOConfig.pack_rows=False)")
    # read, not probed, here: the probe ran when the trainer chose packing (a compiled layer traces this)
    if query.dtype in (torch.float16, torch.bfloat16) and _VARLEN_WORKS.get(str(query.device)):
        return _varlen_rows(query, key, value, packed_cu_seqlens, packed_max_len, scaling), None
    return _sdpa_rows(query, key, value, packed_cu_seqlens, scaling), None


TREE = "studio_tree"
_tree_registered = False


def tree_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                           scaling: float | None = None, tree_blocks=None, tree_max_len=None, **kwargs):
    """transformers attention function for prompt-tree rows (components/training/engine/tree.py): one SDPA call
    per block. query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None). tree_max_len: the
    longest row (prompt + response), which a sliding window must not cut."""
    if tree_blocks is None or attention_mask is not None or dropout or kwargs.get("softcap") \
            or (kwargs.get("sliding_window") or tree_max_len) < tree_max_len:
        raise ValueError("tree attention needs tree_blocks, and takes no mask, dropout, softcap nor sliding "
                         "window; turn it off (tree_rows=False)")
    gqa = query.shape[1] != key.shape[1]
    out = []
    for b in tree_blocks:
        q = query[:, :, b.start:b.end]
        if b.mask is None:
            (s, e), = b.keys
            out.append(torch.nn.functional.scaled_dot_product_attention(
                q, key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=gqa))
            continue
        k = torch.cat([key[:, :, s:e] for s, e in b.keys], dim=2)
        v = torch.cat([value[:, :, s:e] for s, e in b.keys], dim=2)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=b.mask.to(q.device), scale=scaling, enable_gqa=gqa))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register_tree_attention() -> None:
    global _tree_registered
    if not _tree_registered:
        from transformers import AttentionInterface
        AttentionInterface.register(TREE, tree_attention_forward)
        _tree_registered = True


# decoders whose attention transformers runs through its attention interface with rotary positions, causal and
# with no bias, softcap or alibi: packing gives their padded pass's results (tests/test_ppo_speedups.py runs llama)
# (gemma3_text: its query_pre_attn_scalar arrives as `scaling`; gemma2 is left out for its attention softcap)
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite", "phi3", "gemma3_text")


def short_sliding_window(config, longest_row: int) -> int | None:
    """The model's sliding attention window where it is shorter than `longest_row` tokens (else None)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return window if window is not None and window < longest_row else None


def packing_supported(config, longest_row: int) -> bool:
    """Can this decoder run packed rows of up to `longest_row` tokens (`packed_attention_forward`)?"""
    return config.model_type in PACKABLE_MODEL_TYPES and short_sliding_window(config, longest_row) is None


def prefix_sharing_supported(config, longest_row: int) -> bool:
    """Can rows run on a repeated cache of their common prompt prefix? Not where a sliding window is shorter
    than a row: transformers' masks over a cache given in advance then differ from the full pass's (Gemma 3
    measured it: log-probs off by 0.4)."""
    return short_sliding_window(config, longest_row) is None


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
