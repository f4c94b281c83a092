"""Read models: what the app's tabs show, computed from the store and the reward service (the `Studio` facade
exposes each as a method, so a notebook gets the same numbers and figures as the browser)."""
from __future__ import annotations

import math
import time

import pandas as pd

from rlhf_studio.storage import reports

from . import dashboards as dash

SCORED_MAX = 1000   # completions scored for the reward-vs-stars plot (those with cached reward features)


def my_stars(store, completion_ids, annotator: str, criterion: str | None = "overall") -> dict[int, int]:
    """{completion id: stars} of one annotator's current star labels on these completions for a criterion."""
    ids = [int(i) for i in completion_ids]
    if not ids:
        return {}
    df = store.query("SELECT completion_id, stars FROM feedback_current WHERE kind = 'stars' AND annotator = ? "
                     "AND criterion = ? AND completion_id IN (SELECT unnest(?::BIGINT[]))",
                     [annotator, criterion or "overall", ids])
    return {int(c): int(v) for c, v in zip(df["completion_id"], df["stars"])}


def reward_status(reward) -> dict:
    """The reward service right now: the background feature job's progress, whether a deep update is training,
    the last problem met, the deep-update interval and the fast tier's version in memory."""
    p = reward.progress
    return {"running": p.running, "done": p.done, "total": p.total, "message": p.message,
            "deep_training": reward.deep_training(), "last_error": reward.last_error,
            "deep_every": reward.settings.deep_every, "fast_version": reward.fast_version}


def deep_reward_version(reward, look_up: bool = True) -> int | bool | None:
    """The newest deep reward-model version; False where none exists; None where it is not in memory and
    look_up is False (a cheap answer for timers)."""
    if look_up:
        return reward.deep_version if reward.has_deep() else False
    return reward.deep_version if reward.deep is not None else None


def cached_scores(store, reward, criterion: str | None, limit: int = SCORED_MAX) -> pd.DataFrame:
    """Fast-tier scores (columns id, score) of recently star-rated completions whose reward features are cached;
    never runs the model on new texts (that is the reward service's background job)."""
    empty = pd.DataFrame({"id": pd.Series([], dtype="int64"), "score": pd.Series([], dtype="float64")})
    try:
        ids = reports.rated_completion_ids(store, criterion, limit=limit)
        have = store.get_features(reward.revision, ids) if ids else {}
        ids = [i for i in ids if i in have]
        res = reward.visible_scores(ids) if ids else []
    except Exception:
        return empty
    rows = [(i, s[0]) for i, s in zip(ids, res) if s is not None and not math.isnan(s[0])]
    return pd.DataFrame(rows, columns=["id", "score"]) if rows else empty


HIDDEN_BLIND = "hidden in blind mode"


def dashboard(store, reward, criterion: str | None = None, blind_only: bool = False,
              hide_policies: bool = False) -> dict:
    """Every Dashboard figure and table: figures labels_over_time, star_distribution, coverage, reward_vs_stars,
    agreement, leaderboard; tables leaderboard_table, kappa; numbers stats (counts), agreement (statistics),
    seconds. hide_policies: no policy names and no reward scores (blind mode), those figures say so instead."""
    t0 = time.perf_counter()
    agg = dash.agreement_stats(store, criterion)
    if hide_policies:
        table = pd.DataFrame()
        rvs = dash.empty_figure("Reward model vs human stars", HIDDEN_BLIND)
        board = dash.empty_figure("Policy leaderboard", HIDDEN_BLIND)
    else:
        table = dash.leaderboard_table(store, criterion, bool(blind_only))
        rvs = dash.reward_vs_stars(store, cached_scores(store, reward, criterion), criterion)
        board = dash.leaderboard(store, table=table)
    return {"labels_over_time": dash.labels_over_time(store),
            "star_distribution": dash.star_distribution(store, criterion), "coverage": dash.coverage(store), "reward_vs_stars": rvs,
            "agreement": dash.agreement(store, criterion, stats=agg), "leaderboard": board,
            "leaderboard_table": table, "kappa": agg["kappa"], "agreement_stats": agg, "stats": store.stats(),
            "seconds": time.perf_counter() - t0}
