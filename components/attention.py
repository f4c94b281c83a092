"""Attention kernels for passes that are differentiated (PPO updates, the deep reward tier).

Seen on an H200 (torch 2.11, CUDA 13, bf16, LoRA on a SmolLM2-135M shape, 64 left-padded prompts x 128 tokens):
with PyTorch choosing cuDNN's fused attention for the masked SDPA call, the backward pass gave NaN gradients, and
after the first optimizer step every log-prob of the next epoch was NaN. The same step with cuDNN attention off
(PyTorch then runs its memory-efficient kernel; flash attention takes no mask) was finite.
`bench/gpu_nan_probe.py` reproduces it and prints which setting fails.
"""
from __future__ import annotations

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
