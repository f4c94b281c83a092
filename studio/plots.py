"""Plotly figures for the Reward and Train tabs (also usable from a notebook)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _integer_ticks(fig: go.Figure, values) -> None:
    """x axes that count (steps, labels) tick at whole numbers: plotly puts 1.5 between 1 and 2 otherwise. The
    step spans the values' range (labels seen may run from 120 to 132), ~8 ticks at most, 1, 2 or 5 times 10^k."""
    want = max(1.0, (float(max(values)) - float(min(values))) / 8)
    scale = 10 ** math.floor(math.log10(want))
    fig.update_xaxes(tick0=0, dtick=next(m * scale for m in (1, 2, 5, 10) if m * scale >= want))


def empty(title: str, note: str) -> go.Figure:
    """A figure that says `note` where its data would be."""
    fig = go.Figure()
    fig.update_layout(title=title, height=320, margin=dict(l=40, r=20, t=50, b=40),
                      annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")])
    return fig


def reward_curves(metrics: pd.DataFrame) -> go.Figure:
    """Held-out accuracy and BT loss against the number of labels, one line per tier."""
    if metrics is None or len(metrics) == 0 or metrics["heldout_accuracy"].isna().all():
        return empty("Held-out accuracy and loss", "no held-out pairs yet: keep labelling")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for tier, df in metrics.dropna(subset=["heldout_accuracy"]).groupby("tier"):
        df = df.sort_values("labels_seen")
        fig.add_trace(go.Scatter(x=df["labels_seen"], y=df["heldout_accuracy"], mode="lines+markers",
                                 name=f"{tier}: accuracy"), secondary_y=False)
        fig.add_trace(go.Scatter(x=df["labels_seen"], y=df["heldout_loss"], mode="lines", line=dict(dash="dot"),
                                 name=f"{tier}: BT loss"), secondary_y=True)
    fig.update_layout(title="Held-out accuracy and loss", height=340, margin=dict(l=40, r=20, t=50, b=40))
    fig.update_xaxes(title="labels seen")
    _integer_ticks(fig, metrics.dropna(subset=["heldout_accuracy"])["labels_seen"])
    fig.update_yaxes(title="pairwise accuracy", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title="BT loss", secondary_y=True)
    return fig


def reliability(bins) -> go.Figure:
    if not bins:
        return empty("Calibration", "no held-out pairs yet")
    if isinstance(bins, str):
        bins = json.loads(bins)
    if isinstance(bins, dict):
        pred, obs, cnt = bins.get("mean_predicted") or bins.get("pred"), bins.get("observed") or bins.get("obs"), \
            bins.get("count")
    else:   # a list of bins: dicts or tuples of components.reward.bt.ReliabilityBin (lo, hi, mean, observed, count)
        def row(b):
            if isinstance(b, dict):
                return b.get("mean_predicted"), b.get("observed"), b.get("count")
            return (b[2], b[3], b[4]) if len(b) >= 5 else (b[0], b[1], b[2])
        pred, obs, cnt = zip(*[row(b) for b in bins]) if bins else ([], [], [])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="grey"), name="ideal"))
    fig.add_trace(go.Scatter(x=list(pred), y=list(obs), mode="markers+lines", name="model",
                             text=[f"n={c}" for c in (cnt or [])]))
    fig.update_layout(title="Reliability diagram (held-out)", height=320, margin=dict(l=40, r=20, t=50, b=40),
                      xaxis_title="predicted P(chosen wins)", yaxis_title="observed frequency")
    return fig


def score_histogram(scores: np.ndarray) -> go.Figure:
    if scores is None or len(scores) == 0:
        return empty("Scores", "no scored completions yet")
    fig = go.Figure(go.Histogram(x=scores, nbinsx=40))
    fig.update_layout(title="Distribution of reward scores", height=320, margin=dict(l=40, r=20, t=50, b=40))
    return fig


PPO_PANELS = [("reward_mean", "reward (mean ± std)"), ("kl", "KL to reference"), ("entropy", "entropy"),
              ("policy_loss", "policy loss"), ("value_loss", "value loss"), ("clip_frac", "clip fraction"),
              ("response_len", "response length")]


def ppo_curves(metrics: pd.DataFrame) -> go.Figure:
    if metrics is None or len(metrics) == 0:
        return empty("PPO", "no steps yet")
    fig = make_subplots(rows=2, cols=4, subplot_titles=[t for _, t in PPO_PANELS])
    for k, (col, _) in enumerate(PPO_PANELS):
        if col not in metrics:
            continue
        r, c = divmod(k, 4)
        y = metrics[col]
        err = dict(type="data", array=metrics["reward_std"], visible=True) \
            if col == "reward_mean" and "reward_std" in metrics else None
        fig.add_trace(go.Scatter(x=metrics["step"], y=y, mode="lines+markers", error_y=err, showlegend=False),
                      row=r + 1, col=c + 1)
    fig.update_layout(height=480, margin=dict(l=40, r=20, t=50, b=40), title="PPO training")
    _integer_ticks(fig, metrics["step"])
    return fig
