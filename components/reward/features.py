"""Reward features of a completion: what the fast tier's linear head and the deep tier's scalar head read.

The feature of one prompt+completion is the final hidden state (after the last norm) at the last real token,
concatenated with the mean of the final hidden states over the response tokens: [2 * hidden_size].
"""
from __future__ import annotations

import torch


def pool_features(hidden: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Pool final hidden states into one feature vector per sequence.

    hidden:         [B, T, H] final-layer hidden states (after the model's final norm)
    attention_mask: [B, T]    1 for real tokens (left or right padding both work)
    response_mask:  [B, T]    1 for the response tokens (a subset of the real tokens)
    returns:        [B, 2H]   float32: hidden at the last real token ++ mean over response tokens
    """
    B, T, H = hidden.shape
    positions = torch.arange(T, device=hidden.device).expand(B, T)
    last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    last_hidden = hidden[torch.arange(B, device=hidden.device), last.clamp(min=0)]
    rm = response_mask.bool().unsqueeze(-1)
    # where, not a multiply: a padded position's state may be NaN (an attention kernel given a fully masked
    # row), and NaN * 0 is NaN
    mean_resp = torch.where(rm, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1) \
        / rm.sum(1).clamp(min=1).to(hidden.dtype)
    return torch.cat([last_hidden, mean_resp], dim=-1).float()
