"""Dashboards: functions of a `storage.Store` returning plotly figures (also usable from a notebook).

Every aggregation runs in DuckDB (storage/reports.py); Python only turns the small aggregated frames into
figures and computes the agreement / Bradley-Terry statistics (numpy, implemented here).

Figures: labels_over_time, star_distribution, coverage, reward_vs_stars (scores passed in as id -> score),
agreement, leaderboard. Tables / numbers: agreement_stats, policy_record, leaderboard_table.

Statistics
- Cohen's kappa for two annotators from their confusion matrix: (p_o - p_e) / (1 - p_e); optionally weighted
  (linear |i-j| or quadratic (i-j)^2 disagreement weights): 1 - sum(w O) / sum(w E).
- Krippendorff's alpha from the coincidence matrix o (any number of annotators, missing ratings allowed):
  alpha = 1 - (n - 1) * sum(o_ck d_ck) / sum(n_c n_k d_ck), n_c = row sums of o, n = sum(n_c);
  d = nominal [c != k], interval (c - k)^2, ordinal (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2.
  Stars: units = completions rated by >= 2 annotators. Pairwise choices: units = unordered pairs judged by
  >= 2 annotators, values = which side won / tie / both bad (nominal alpha and the observed agreement).
- Bradley-Terry scores of policies from blind pairwise votes (ties and both-bad count half a win to each
  side), maximum a-posteriori with a small Gaussian prior (`prior`, default 0.1, keeps an undefeated policy
  finite; prior=0 is the plain MLE), the base model fixed at 0. The 95% interval is +-1.96 standard errors
  from the inverse Fisher information (the Hessian of the negative log posterior). Scores are shown on the
  Elo scale: 1000 + 400 / ln(10) * theta (base = 1000).
"""
from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rlhf_studio.storage import reports as q

ELO_SCALE = 400.0 / math.log(10.0)
ELO_BASE = 1000.0
_H = 360
_MARGIN = dict(l=50, r=20, t=60, b=40)


def empty_figure(title: str, note: str) -> go.Figure:
    """A figure that says `note` in place of data (plotly reads markup in both: pass user text through plot_text)."""
    fig = go.Figure()
    fig.update_layout(title=title, height=_H, margin=_MARGIN, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")])
    return fig


def _short(text: str, n: int = 48) -> str:
    t = " ".join(str(text).split())
    return plot_text(t if len(t) <= n else t[: n - 1] + "…")


def plot_text(text) -> str:
    """Text from users, imports or models as plotly shows it: plotly reads <a href>, <b>, <br> ... in titles, axis
    labels, legends and hover text as markup; entities show the characters instead."""
    return html.escape(str(text), quote=False)


def _plot_texts(values) -> list[str]:
    return [plot_text(v) for v in values]


# ================================================================================================ statistics
def cohen_kappa(confusion, weights: str | None = None) -> float:
    """Cohen's kappa of a k x k confusion matrix (rows: annotator 1, columns: annotator 2, same ordered
    categories). weights None (plain kappa), "linear" or "quadratic" (weighted kappa). NaN when undefined."""
    o = np.asarray(confusion, dtype=float)
    if o.ndim != 2 or o.shape[0] != o.shape[1]:
        raise ValueError("the confusion matrix must be square")
    n = o.sum()
    if n <= 0:
        return float("nan")
    e = np.outer(o.sum(1), o.sum(0)) / n
    k = o.shape[0]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights is None:
        w = (i != j).astype(float)
    elif weights == "linear":
        w = np.abs(i - j).astype(float)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(float)
    else:
        raise ValueError("weights must be None, 'linear' or 'quadratic'")
    de = (w * e).sum()
    if de <= 0:
        return float("nan")
    return float(1.0 - (w * o).sum() / de)


def coincidence_matrix(data, values: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Krippendorff coincidence matrix from reliability data (annotators x units; NaN / None = missing).
    Returns (values, o). Reference implementation (the dashboards compute the same matrix in SQL)."""
    d = np.array([[np.nan if v is None else float(v) for v in row] for row in data], dtype=float)
    vals = np.array(sorted(set(d[~np.isnan(d)].tolist())) if values is None else list(values), dtype=float)
    idx = {v: i for i, v in enumerate(vals)}
    o = np.zeros((len(vals), len(vals)))
    for u in range(d.shape[1]):
        col = d[:, u][~np.isnan(d[:, u])]
        m = len(col)
        if m < 2:
            continue
        cnt = np.zeros(len(vals))
        for v in col:
            cnt[idx[v]] += 1
        o += (np.outer(cnt, cnt) - np.diag(cnt)) / (m - 1)
    return vals, o


def krippendorff_alpha(o, values: Sequence[float] | None = None, metric: str = "interval") -> float:
    """Krippendorff's alpha from a coincidence matrix `o` over ordered `values` (default 0..k-1).
    metric: "nominal" | "ordinal" | "interval". NaN when undefined (no pairable values or no variation)."""
    o = np.asarray(o, dtype=float)
    k = o.shape[0]
    vals = np.arange(k, dtype=float) if values is None else np.asarray(values, dtype=float)
    nc = o.sum(1)
    n = nc.sum()
    if n <= 1:
        return float("nan")
    if metric == "nominal":
        d = 1.0 - np.eye(k)
    elif metric == "interval":
        d = (vals[:, None] - vals[None, :]) ** 2
    elif metric == "ordinal":
        cum = np.concatenate([[0.0], np.cumsum(nc)])
        d = np.zeros((k, k))
        for c in range(k):
            for e in range(k):
                lo, hi = min(c, e), max(c, e)
                d[c, e] = (cum[hi + 1] - cum[lo] - (nc[c] + nc[e]) / 2.0) ** 2
    else:
        raise ValueError("metric must be 'nominal', 'ordinal' or 'interval'")
    de = (np.outer(nc, nc) * d).sum()
    if de <= 0:
        return float("nan")
    return float(1.0 - (n - 1) * (o * d).sum() / de)


def bradley_terry(wins, prior: float = 0.1, ref: int = 0, tol: float = 1e-10,
                  max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Bradley-Terry strengths from a P x P matrix wins[i, j] = times i beat j (ties: 0.5 to each side).
    Newton's method on the log posterior with a Gaussian prior (precision `prior`) on the free strengths,
    theta[ref] = 0. Returns (theta, standard errors from the inverse Fisher information; 0 for ref)."""
    w = np.asarray(wins, dtype=float)
    p = w.shape[0]
    theta = np.zeros(p)
    se = np.zeros(p)
    if p < 2:
        return theta, se
    n = w + w.T
    free = np.array([i for i in range(p) if i != ref])

    def objective(t):
        diff = t[:, None] - t[None, :]
        # log-likelihood: sum_ij w_ij * log sigmoid(t_i - t_j)
        ll = -(w * np.logaddexp(0.0, -diff)).sum()
        return ll - 0.5 * prior * (t[free] ** 2).sum()

    def grad_hess(t):
        diff = t[:, None] - t[None, :]
        pij = 1.0 / (1.0 + np.exp(-diff))
        g = (w - n * pij).sum(1)  # d/dt_i (using w_ij + w_ji = n_ij)
        v = n * pij * (1.0 - pij)
        info = np.diag(v.sum(1)) - v  # Fisher information of the likelihood
        g = g[free] - prior * t[free]
        info = info[np.ix_(free, free)] + prior * np.eye(len(free))
        return g, info

    f = objective(theta)
    for _ in range(max_iter):
        g, info = grad_hess(theta)
        try:
            step = np.linalg.solve(info, g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(info, g, rcond=None)[0]
        a = 1.0
        while a > 1e-8:
            cand = theta.copy()
            cand[free] += a * step
            fc = objective(cand)
            if fc >= f - 1e-12:
                break
            a /= 2
        theta, f = cand, fc
        if np.max(np.abs(a * step)) < tol:
            break
    _, info = grad_hess(theta)
    try:
        cov = np.linalg.inv(info)
        se[free] = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        se[free] = np.inf
    return theta, se


# ================================================================================================ tables
def agreement_stats(store, criterion: str | None = "overall", top: int = 12) -> dict:
    """Inter-annotator agreement on current labels: stars (Krippendorff alpha nominal/ordinal/interval over all
    annotators, Cohen's kappa per annotator pair) and pairwise choices (nominal alpha, observed agreement)."""
    out: dict = {}
    co, conf = q.star_agreement(store, criterion)
    vals = [1, 2, 3, 4, 5]
    o = np.zeros((5, 5))
    for r in co.itertuples():
        o[int(r.c) - 1, int(r.k) - 1] = r.o
    out["stars_pairable"] = float(o.sum())
    for m in ("nominal", "ordinal", "interval"):
        out[f"stars_alpha_{m}"] = krippendorff_alpha(o, vals, m)
    rows = []
    for (a1, a2), g in conf.groupby(["a1", "a2"], sort=True):
        m = np.zeros((5, 5))
        m[g["s1"].to_numpy(int) - 1, g["s2"].to_numpy(int) - 1] = g["n"].to_numpy(float)
        rows.append((a1, a2, int(m.sum()), cohen_kappa(m), cohen_kappa(m, "quadratic"),
                     float(np.trace(m) / m.sum())))
    kappa = pd.DataFrame(rows, columns=["a1", "a2", "n", "kappa", "kappa_quadratic", "exact_agreement"])
    out["kappa"] = kappa.sort_values(["n", "a1", "a2"], ascending=[False, True, True]).reset_index(drop=True)
    pc = q.pairwise_coincidences(store, criterion)
    cats = ["lo", "hi", "tie", "both_bad"]
    po = np.zeros((4, 4))
    for r in pc.itertuples():
        po[cats.index(r.c), cats.index(r.k)] = r.o
    out["pairwise_pairable"] = float(po.sum())
    out["pairwise_alpha_nominal"] = krippendorff_alpha(po, None, "nominal")
    out["pairwise_agreement"] = float(np.trace(po) / po.sum()) if po.sum() > 0 else float("nan")
    return out


class PolicyTally:
    """The current pairwise votes between policies, counted once for the win rates and the leaderboard.
    Policies are `policy_votes`' ids (0 = base) named as there: "base", "<adapter name> #<adapter id>"."""

    def __init__(self, votes: pd.DataFrame):
        self.ids = sorted(set(votes["p1"]).union(votes["p2"]))
        self.names: dict[int, str] = {}
        for r in votes.itertuples():
            self.names[int(r.p1)], self.names[int(r.p2)] = r.name1, r.name2
        self.index = {p: i for i, p in enumerate(self.ids)}
        P = len(self.ids)
        self.w = np.zeros((P, P))          # w[i, j]: wins of i over j, a tie or both-bad counting half to each
        self.wins, self.losses, self.ties = np.zeros(P), np.zeros(P), np.zeros(P)
        for r in votes.itertuples():
            i, j = self.index[int(r.p1)], self.index[int(r.p2)]
            t = float(r.ties + r.both_bad)
            self.w[i, j] += r.wins1 + 0.5 * t
            self.w[j, i] += r.wins2 + 0.5 * t
            self.wins[i] += r.wins1
            self.wins[j] += r.wins2
            self.losses[i] += r.wins2
            self.losses[j] += r.wins1
            self.ties[i] += t
            self.ties[j] += t

    def record(self) -> pd.DataFrame:
        """policy, votes, wins, losses, ties (ties + both bad), win_rate (ties half), in policy id order."""
        votes = self.wins + self.losses + self.ties
        return pd.DataFrame({
            "policy": [self.names[p] for p in self.ids], "votes": votes.astype(int), "wins": self.wins.astype(int),
            "losses": self.losses.astype(int), "ties": self.ties.astype(int),
            "win_rate": np.where(votes > 0, (self.wins + 0.5 * self.ties) / np.maximum(votes, 1), np.nan)})


_RECORD_COLS = ["policy", "votes", "wins", "losses", "ties", "win_rate"]


def policy_record(store, criterion: str | None = "overall", blind_only: bool = False) -> pd.DataFrame:
    """One row per policy that has votes: policy, votes, wins, losses, ties (ties + both bad), win_rate (ties
    half); base first, then the adapters by id."""
    v = q.policy_votes(store, criterion, blind_only)
    return PolicyTally(v).record() if len(v) else pd.DataFrame(columns=_RECORD_COLS)


def leaderboard_table(store, criterion: str | None = "overall", blind_only: bool = False,
                      prior: float = 0.1) -> pd.DataFrame:
    """One row per policy (base and each adapter): rating (Elo scale, base = 1000), 95% interval, theta, se,
    votes, wins, losses, ties (ties + both bad), win_rate (ties half), sorted best first."""
    cols = ["policy", "rating", "ci_low", "ci_high", "theta", "se"] + _RECORD_COLS[1:]
    v = q.policy_votes(store, criterion, blind_only)
    if len(v) == 0:
        return pd.DataFrame(columns=cols)
    tally = PolicyTally(v)
    theta, se = bradley_terry(tally.w, prior=prior, ref=tally.index.get(0, 0))
    rating = ELO_BASE + ELO_SCALE * theta
    df = tally.record().assign(rating=rating, ci_low=rating - 1.96 * ELO_SCALE * se,
                               ci_high=rating + 1.96 * ELO_SCALE * se, theta=theta, se=se)
    return df.sort_values(["rating", "policy"], ascending=[False, True]).reset_index(drop=True)[cols]


# ================================================================================================ figures
def _unit(first, last) -> str:
    if first is None or last is None:
        return "day"
    span = (pd.Timestamp(last) - pd.Timestamp(first)).total_seconds()
    if span <= 4 * 86400:
        return "hour"
    if span <= 150 * 86400:
        return "day"
    if span <= 3 * 365 * 86400:
        return "week"
    return "month"


_UNIT_DAYS = {"hour": 1 / 24, "day": 1, "week": 7, "month": 30.4}
_MS = pd.Timedelta(1, "ms")


def labels_over_time(store, unit: str | None = None, top_annotators: int = 10) -> go.Figure:
    """Labels given per hour/day/week/month (automatic from the time span), stacked by kind (top) and by
    annotator (bottom; the busiest `top_annotators`, the rest as '(other)'). Replaced labels count: activity."""
    first, last, total = q.time_span(store)
    title = "Labels over time"
    if total == 0:
        return empty_figure(title, "no labels yet")
    unit = unit or _unit(first, last)
    df = q.labels_over_time(store, unit, top_annotators)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("by kind", "by annotator"))
    # each bar as wide as its period, the axis at least one period either side: with every label in one hour,
    # plotly otherwise spans a millisecond and ticks at 19:59:59.9996
    width = pd.Timedelta(_UNIT_DAYS[unit], "D")
    df = df.assign(t=pd.to_datetime(df["t"]))
    for row, by in ((1, "kind"), (2, "annotator")):
        part = df[df["dim"] == by]
        for i, (key, g) in enumerate(part.groupby("grp", sort=True)):
            # x: the middle of the period that starts at t
            fig.add_trace(go.Bar(x=g["t"] + width / 2, y=g["n"], name=plot_text(key), legendgroup=by,
                                 width=0.9 * width / _MS, customdata=g["t"].astype(str),
                                 hovertemplate="%{customdata}: %{y}", legendgrouptitle_text=by if i == 0 else None),
                          row=row, col=1)
    fig.update_xaxes(range=[df["t"].min() - width / 2, df["t"].max() + 1.5 * width])
    fig.update_layout(barmode="stack", title=f"{title} ({total:,} labels, per {unit})", height=560,
                      margin=_MARGIN, legend=dict(groupclick="toggleitem"))
    fig.update_yaxes(title_text="labels", row=1, col=1)
    fig.update_yaxes(title_text="labels", row=2, col=1)
    return fig


def star_distribution(store, criterion: str | None = None) -> go.Figure:
    """Current star labels 1..5 per criterion, human and imported separately."""
    df = q.star_distribution(store, criterion)
    title = "Star ratings" + (f" ({plot_text(criterion)})" if criterion else "")
    if len(df) == 0:
        return empty_figure(title, "no star ratings yet")
    fig = go.Figure()
    for (crit, origin), g in df.groupby(["criterion", "origin"], sort=True):
        n = g.set_index("stars")["n"].reindex(range(1, 6), fill_value=0)
        total = int(n.sum())
        mean = float((n.index.to_numpy() * n.to_numpy()).sum() / total) if total else float("nan")
        fig.add_trace(go.Bar(x=list(n.index), y=n.to_numpy(),
                             name=f"{plot_text(crit)} · {plot_text(origin)} (n={total:,}, mean {mean:.2f})",
                             customdata=(n.to_numpy() / max(total, 1) * 100).round(1),
                             hovertemplate="%{x} stars: %{y} (%{customdata}%)<extra>%{fullData.name}</extra>"))
    fig.update_layout(barmode="group", title=title, height=_H, margin=_MARGIN,
                      xaxis=dict(title="stars", tickmode="array", tickvals=[1, 2, 3, 4, 5]),
                      yaxis_title="current labels")
    return fig


def coverage(store, fewest: int = 20, cap: int = 50, exclude_imported: bool = False) -> go.Figure:
    """How many prompts have 0, 1, 2, ... current labels (left) and the prompts with the fewest (right)."""
    hist, low = q.coverage(store, fewest, cap, exclude_imported)
    title = "Coverage"
    if len(hist) == 0:
        return empty_figure(title, "no prompts yet")
    n_prompts = int(hist["prompts"].sum())
    none = int(hist.loc[hist["n"] == 0, "prompts"].sum())
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.25,
                        subplot_titles=("prompts by number of labels", f"{len(low)} least-labelled prompts"))
    xs = [f"{int(n)}+" if int(n) >= cap else str(int(n)) for n in hist["n"]]
    fig.add_trace(go.Bar(x=xs, y=hist["prompts"], name="prompts", showlegend=False,
                         hovertemplate="%{x} labels: %{y} prompts<extra></extra>"), row=1, col=1)
    low = low.iloc[::-1]
    fig.add_trace(go.Bar(x=low["n"], y=[f"#{int(i)} {_short(t, 36)}" for i, t in zip(low["id"], low["text"])],
                         orientation="h", showlegend=False, customdata=np.stack([low["text"].map(_short),
                                                                                 low["source"].map(plot_text)], axis=1),
                         hovertemplate="%{customdata[0]}<br>source %{customdata[1]}<br>%{x} labels<extra></extra>"),
                  row=1, col=2)
    fig.update_xaxes(title_text="current labels", type="category", row=1, col=1)
    fig.update_xaxes(title_text="current labels", row=1, col=2)
    fig.update_layout(title=f"{title}: {n_prompts:,} prompts, {none:,} without a label", height=max(_H, 22 * len(low)
                                                                                                  + 120),
                      margin=dict(l=50, r=20, t=70, b=40))
    return fig


def _scores_frame(scores) -> pd.DataFrame:
    if isinstance(scores, pd.Series):
        return pd.DataFrame({"id": scores.index, "score": scores.to_numpy()})
    if isinstance(scores, Mapping):
        return pd.DataFrame({"id": list(scores.keys()), "score": list(scores.values())})
    df = pd.DataFrame(scores)
    if "id" not in df.columns and "completion_id" in df.columns:
        df = df.rename(columns={"completion_id": "id"})
    if "score" not in df.columns and "mean" in df.columns:
        df = df.rename(columns={"mean": "score"})
    if not {"id", "score"} <= set(df.columns):
        raise ValueError("scores must have columns id and score (or be a Series / dict id -> score)")
    return df[["id", "score"]]


def reward_vs_stars(store, scores, criterion: str | None = "overall", max_points: int = 5000) -> go.Figure:
    """Reward-model score vs the mean current human stars of each completion, with Pearson r and Spearman rho
    over all matched completions. `scores`: DataFrame with columns id, score (or a Series / dict id -> score),
    so this stays a pure storage + plot function (the caller scores the completions)."""
    title = "Reward model vs human stars"
    frame = _scores_frame(scores)
    if len(frame) == 0:
        return empty_figure(title, "no reward scores given (train a reward model first)")
    points, stats, bins = q.stars_vs_scores(store, frame, criterion, max_points)
    if stats["n"] == 0:
        return empty_figure(title, "none of the scored completions has a star rating")
    # deterministic jitter so that the discrete star values do not hide each other
    jitter = ((points["completion_id"].to_numpy(np.int64) * 2654435761) % 1000) / 1000.0 * 0.3 - 0.15
    fig = go.Figure()
    fig.add_trace(go.Scattergl(x=points["mean_stars"] + jitter, y=points["score"], mode="markers", name="completion",
                               marker=dict(size=5, opacity=0.45),
                               customdata=np.stack([points["completion_id"], points["mean_stars"],
                                                    points["n_ratings"]], axis=1),
                               hovertemplate="completion %{customdata[0]}<br>mean stars %{customdata[1]:.2f} "
                                             "(%{customdata[2]} ratings)<br>score %{y:.3f}<extra></extra>"))
    if len(bins):
        fig.add_trace(go.Scatter(x=bins["stars"], y=bins["mean_score"], mode="lines+markers", name="mean score",
                                 error_y=dict(type="data", array=bins["std_score"].fillna(0), visible=True),
                                 line=dict(width=3)))

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    sub = f" (showing {len(points):,})" if len(points) < stats["n"] else ""
    fig.update_layout(title=f"{title}: Pearson r = {fmt(stats['pearson'])}, Spearman ρ = {fmt(stats['spearman'])}, "
                            f"n = {stats['n']:,}{sub}",
                      height=_H + 40, margin=_MARGIN, xaxis=dict(title="mean human stars", tickvals=[1, 2, 3, 4, 5]),
                      yaxis_title="reward score")
    return fig


def agreement(store, criterion: str | None = "overall", top: int = 12, stats: dict | None = None) -> go.Figure:
    """Inter-annotator agreement: Cohen's kappa between the annotators who overlap most (heatmap, stars) and
    the summary statistics (Krippendorff alpha on stars; alpha and observed agreement on pairwise choices)."""
    st = stats if stats is not None else agreement_stats(store, criterion)
    title = "Inter-annotator agreement"
    kap = st["kappa"]
    if st["stars_pairable"] == 0 and st["pairwise_pairable"] == 0:
        return empty_figure(title, "no completion or pair was labelled by two annotators yet")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.24,
                        subplot_titles=("Cohen's kappa on stars (annotator pairs)", "summary"))
    if len(kap):
        # annotators with the largest overlap, at most `top`
        tot = pd.concat([kap[["a1", "n"]].rename(columns={"a1": "a"}), kap[["a2", "n"]].rename(columns={"a2": "a"})])
        who = tot.groupby("a")["n"].sum().sort_values(ascending=False).head(top).index.tolist()
        who = sorted(who)
        mat = np.full((len(who), len(who)), np.nan)
        cnt = np.zeros((len(who), len(who)), dtype=int)
        pos = {a: i for i, a in enumerate(who)}
        for r in kap.itertuples():
            if r.a1 in pos and r.a2 in pos:
                i, j = pos[r.a1], pos[r.a2]
                mat[i, j] = mat[j, i] = r.kappa
                cnt[i, j] = cnt[j, i] = r.n
        fig.add_trace(go.Heatmap(z=mat, x=_plot_texts(who), y=_plot_texts(who), zmin=-1, zmax=1, colorscale="RdBu", customdata=cnt,
                                 colorbar=dict(x=0.455, len=0.9, thickness=12, title="κ"),
                                 hovertemplate="%{y} × %{x}<br>κ = %{z:.3f}<br>%{customdata} shared<extra></extra>"),
                      row=1, col=1)
    names = ["stars α ordinal", "stars α interval", "stars α nominal", "pairwise α nominal", "pairwise agreement"]
    keys = ["stars_alpha_ordinal", "stars_alpha_interval", "stars_alpha_nominal", "pairwise_alpha_nominal",
            "pairwise_agreement"]
    vals = [st[k] for k in keys]
    fig.add_trace(go.Bar(x=[0 if math.isnan(v) else v for v in vals], y=names, orientation="h", showlegend=False,
                         text=["n/a" if math.isnan(v) else f"{v:.3f}" for v in vals], textposition="auto"),
                  row=1, col=2)
    fig.update_xaxes(range=[min(-0.1, min([v for v in vals if not math.isnan(v)] or [0])), 1], row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_layout(title=f"{title} (stars: {st['stars_pairable']:,.0f} pairable ratings; pairwise: "
                            f"{st['pairwise_pairable']:,.0f} pairable votes)", height=_H + 80, margin=_MARGIN)
    return fig


def leaderboard(store, criterion: str | None = "overall", blind_only: bool = False, prior: float = 0.1,
                table: pd.DataFrame | None = None) -> go.Figure:
    """Policies (base and adapters) ranked by Bradley-Terry score (Elo scale) from pairwise votes between
    completions of different policies, with 95% intervals."""
    df = table if table is not None else leaderboard_table(store, criterion, blind_only, prior)
    title = "Policy leaderboard (Bradley-Terry, Elo scale)"
    if len(df) == 0:
        return empty_figure(title, "no votes between different policies yet (use the Blind compare tab)")
    d = df.iloc[::-1]
    fig = go.Figure(go.Scatter(
        x=d["rating"], y=_plot_texts(d["policy"]), mode="markers", marker=dict(size=12),
        error_x=dict(type="data", symmetric=False, array=d["ci_high"] - d["rating"],
                     arrayminus=d["rating"] - d["ci_low"]),
        customdata=np.stack([d["votes"], d["wins"], d["losses"], d["ties"], d["win_rate"] * 100], axis=1),
        hovertemplate="%{y}: %{x:.0f}<br>%{customdata[0]} votes: %{customdata[1]} won, %{customdata[2]} lost, "
                      "%{customdata[3]} tied<br>win rate %{customdata[4]:.1f}%<extra></extra>"))
    fig.add_vline(x=ELO_BASE, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, height=max(_H, 50 * len(df) + 140), margin=dict(l=140, r=20, t=60, b=40),
                      xaxis_title="rating (base = 1000), 95% interval")
    return fig
