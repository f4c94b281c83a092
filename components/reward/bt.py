"""Bradley-Terry math: the pairwise loss, accuracy and calibration of P(chosen beats rejected).

Under the Bradley-Terry model P(a beats b) = sigmoid(r(a) - r(b)). The loss of one labelled pair is
-log sigmoid(r(chosen) - r(rejected) - margin), where the optional margin (Llama-2's reward model) asks a
strongly preferred pair (e.g. a star difference) to be separated by more than a weakly preferred one.

Calibration helpers take p_chosen, the predicted probability that the labelled winner wins. Since every
pair's outcome is "chosen won", a reliability diagram of p_chosen alone would be degenerate (all observed
frequencies 1); by default each pair therefore counts twice, as (p, won) and (1 - p, lost), which is the
same pair seen from either side and gives a diagram symmetric about (0.5, 0.5).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(chosen - rejected - margin).

    chosen, rejected: [N] scores; margin: [N] or None (0). reduction: "mean", "sum" or "none".
    Computed as softplus(-(diff)), which is exact and stable for large |diff|.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = F.softplus(-diff)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def pairwise_accuracy(chosen, rejected) -> float:
    """Fraction of pairs where chosen scores above rejected; an exact tie counts as half right.

    Accepts tensors, arrays or lists. Returns nan for no pairs.
    """
    c, r = _np(chosen), _np(rejected)
    if c.shape != r.shape:
        raise ValueError(f"chosen and rejected differ in length ({c.size} vs {r.size})")
    if c.size == 0:
        return float("nan")
    return float(((c > r) + 0.5 * (c == r)).mean())


class ReliabilityBin(NamedTuple):
    lo: float               # bin edges on the predicted probability
    hi: float
    mean_predicted: float   # mean predicted probability of the items in the bin
    observed: float         # observed frequency of "won" among them
    count: int


def _outcomes(p, outcomes, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    p = _np(p)
    if outcomes is not None:
        y = _np(outcomes)
        if y.shape != p.shape:
            raise ValueError("outcomes must have one entry per probability")
        return p, y
    if symmetric:
        return np.concatenate([p, 1.0 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)])
    return p, np.ones_like(p)


def reliability_bins(p_chosen, n_bins: int = 10, outcomes=None, symmetric: bool = True) -> list[ReliabilityBin]:
    """Equal-width bins of predicted probability for a reliability diagram; empty bins are left out.

    p_chosen: predicted P(labelled winner wins) per pair. outcomes: optional 0/1 per item, for callers whose
    predictions are not all about the winner; without it each pair counts as (p, 1) and, if symmetric, also
    as (1 - p, 0).
    """
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    p, y = _outcomes(p_chosen, outcomes, symmetric)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), float(p[sel].mean()),
                                      float(y[sel].mean()), n))
    return out


def expected_calibration_error(p_chosen, n_bins: int = 10, outcomes=None, symmetric: bool = True) -> float:
    """ECE: sum over bins of (bin share) * |mean predicted - observed frequency|; nan for no pairs."""
    bins = reliability_bins(p_chosen, n_bins, outcomes, symmetric)
    total = sum(b.count for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b.count / total * abs(b.mean_predicted - b.observed) for b in bins))
