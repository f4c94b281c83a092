"""Tensor operations every algorithm's math and the engine's passes share (pure functions, no model).

Shapes: B = sequences in the batch, T = response tokens (right-padded to T), V = vocabulary; `mask` is 1.0 on
real response tokens (up to and including the first EOS) and 0.0 after.
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ----------------------------------------------------------------------------------------------------------

def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label) under softmax(logits / temperature).

    logits: [B, T, V] (any float dtype; computed in float32), labels: [B, T] int64 -> [B, T] float32.
    Uses gather - logsumexp, so no [B, T, V] log-softmax tensor is kept beyond the float32 logits themselves.
    The temperature must be the sampling temperature: the rollout sampled from softmax(logits / temperature).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: [B, T, V] -> [B, T] float32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v   (z = logits / temperature).
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    return lse - (torch.softmax(z, dim=-1) * z).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked entries (unbiased: Bessel's correction n / (n - 1), as TRL)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; shift_mean=False keeps the mean (scales only).

    Entries outside the mask are returned as computed (callers multiply by the mask where it matters).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened
