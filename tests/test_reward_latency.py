"""Incremental fast-tier refits (issue 3, "label -> refreshed scores under 1 s with 10,000 labels"): the
warm-started, completion-space fit gives the model a from-scratch fit gives; bulk label loads keep the Store's
contract. Speed itself is measured in bench/bench_reward_latency.py, never asserted here."""
import math

import numpy as np
import pytest

from rlhf_studio.components.reward import fast as fastmod
from rlhf_studio.components.reward.fast import FastRewardModel


def _pairs(rng, C, n, F, dup_pool=None):
    """Features of C completions in groups of 5 (one prompt each) and n labelled pairs within groups, drawn
    from a Bradley-Terry model; many pairs repeat (several annotators, rankings), as in the app."""
    w_true = rng.normal(size=F) / math.sqrt(F)
    X = rng.normal(size=(C, F)).astype(np.float32)
    u = 3 * X @ w_true
    g = rng.integers(0, C // 5, size=n)
    a = g * 5 + rng.integers(0, 5, size=n)
    b = g * 5 + (a - g * 5 + rng.integers(1, 5, size=n)) % 5
    a_wins = rng.random(n) < 1 / (1 + np.exp(-(u[a] - u[b])))
    return X, np.where(a_wins, a, b), np.where(a_wins, b, a)


def _close(m1, m2, rtol=1e-5):
    scale = np.abs(m2.weight).max()
    assert np.abs(m1.weight - m2.weight).max() <= rtol * scale
    assert np.allclose(m1.mean, m2.mean, rtol=1e-9, atol=1e-9)
    assert np.allclose(m1.std, m2.std, rtol=1e-9)
    assert np.allclose(m1.cov, m2.cov, rtol=1e-3, atol=1e-4 * np.abs(m2.cov).max())
    assert m1.l2 == pytest.approx(m2.l2, rel=1e-9) and m1.n_pairs == m2.n_pairs


def test_indexed_fit_is_the_dense_fit_with_cv_margins_and_duplicates():
    rng = np.random.default_rng(0)
    X, ci, ri = _pairs(rng, C=100, n=1500, F=48)
    margin = rng.integers(0, 3, size=len(ci)).astype(float)
    dense = FastRewardModel().fit(X[ci], X[ri], margin=margin)
    ind = FastRewardModel().fit_indexed(X, ci, ri, margin=margin)
    assert dense.cv is not None and ind.cv["c"] == dense.cv["c"]
    assert np.allclose(ind.cv["loss"], dense.cv["loss"], rtol=1e-6)       # the same CV subset and folds
    _close(ind, dense)
    T = rng.normal(size=(50, 48))
    for a1, a2 in zip(ind.score(T), dense.score(T)):
        assert np.allclose(a1, a2, rtol=1e-4, atol=1e-6)


def test_warm_started_refit_equals_from_scratch_after_new_labels():
    rng = np.random.default_rng(1)
    X, ci, ri = _pairs(rng, C=150, n=2000, F=64)
    prev = FastRewardModel().fit_indexed(X, ci[:1800], ri[:1800], l2=20.0)       # before 200 more pairs
    scratch = FastRewardModel().fit(X[ci], X[ri], l2=20.0)
    warm = FastRewardModel().fit_indexed(X, ci, ri, l2=20.0, warm_start=prev)
    _close(warm, scratch)
    # a warm start from a model with another standardisation (X_ref) is re-expressed, not reused blindly
    other = FastRewardModel().fit(X[ci[:900]], X[ri[:900]], l2=5.0, X_ref=X[:40])
    warm2 = FastRewardModel().fit_indexed(X, ci, ri, l2=20.0, warm_start=other)
    _close(warm2, scratch)
    # and an unrelated model (other feature size) is ignored
    small = FastRewardModel().fit(X[ci[:50], :8], X[ri[:50], :8])
    _close(FastRewardModel().fit_indexed(X, ci, ri, l2=20.0, warm_start=small), scratch)
    # the optimum: gradient of the penalised loss ~0 on the dense rows
    D = (X[ci].astype(np.float64) - X[ri]) / warm.std
    p = 1 / (1 + np.exp(-(D @ warm.weight)))
    assert np.abs(-(D.T @ (1 - p)) + 20.0 * warm.weight).max() < 1e-4


def test_indexed_fit_all_paths_dense_rows_sparse_hessian_dual_and_x_ref(monkeypatch):
    rng = np.random.default_rng(2)
    F = 32
    # every pair with its own completions: more completions than distinct pairs -> dense pair rows
    X = rng.normal(size=(600, F)).astype(np.float32)
    ci, ri = np.arange(0, 600, 2), np.arange(1, 600, 2)
    _close(FastRewardModel().fit_indexed(X, ci, ri, l2=3.0), FastRewardModel().fit(X[ci], X[ri], l2=3.0))
    # the sparse completion-space Hessian (as for more than DENSE_MAX_C completions)
    X, ci, ri = _pairs(rng, C=100, n=800, F=F)
    ref = FastRewardModel().fit(X[ci], X[ri], l2=3.0, X_ref=X)
    monkeypatch.setattr(fastmod._IndexedDesign, "DENSE_MAX_C", 10)
    _close(FastRewardModel().fit_indexed(X, ci, ri, l2=3.0, X_ref=X), ref)
    monkeypatch.undo()
    # few pairs: the dual path, via fit; extra rows of X that no pair uses change nothing
    few = FastRewardModel().fit_indexed(X, ci[:15], ri[:15], l2=3.0)
    _close(few, FastRewardModel().fit(X[ci[:15]], X[ri[:15]], l2=3.0))
    with pytest.raises(ValueError):
        FastRewardModel().fit_indexed(X, ci, ri[:-1])
    with pytest.raises(ValueError):
        FastRewardModel().fit_indexed(X, ci, ri + 1000)
    with pytest.raises(ValueError):
        FastRewardModel().fit_indexed(X, [], [])


def test_evaluate_indexed_matches_evaluate(monkeypatch):
    rng = np.random.default_rng(3)
    X, ci, ri = _pairs(rng, C=60, n=700, F=24)
    m = FastRewardModel().fit_indexed(X, ci[:500], ri[:500])
    want = m.evaluate(X[ci[500:]], X[ri[500:]])
    for dense_max in (4096, 0):                 # the C x C route and the per-pair route
        monkeypatch.setattr(fastmod._IndexedDesign, "DENSE_MAX_C", dense_max)
        got = m.evaluate_indexed(X, ci[500:], ri[500:])
        assert got["n"] == want["n"] == 200
        for k in ("accuracy", "loss", "ece"):
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9)
        assert [b["count"] for b in got["bins"]] == [b["count"] for b in want["bins"]]
    assert math.isnan(m.evaluate_indexed(X, [], [])["accuracy"])


# ------------------------------------------------------------------------------------- bulk label loads

def _prompt(st, text, n):
    pid = st.add_prompt(text)
    return pid, st.add_completions([{"prompt_id": pid, "text": f"{text} / answer {i}"} for i in range(n)])


def test_bulk_labels_one_verified_transaction_same_pairs_as_one_by_one(fresh_store, tmp_path):
    from rlhf_studio.storage import InvalidInput, NotFound, Store
    from rlhf_studio.storage.io.bulk import add_feedback_many
    st = fresh_store
    _, (a, b, c) = _prompt(st, "Name a fruit", 3)
    _, (d, e) = _prompt(st, "Say hi", 2)
    rows = [dict(kind="pairwise", completion_id=a, other_completion_id=b, winner="a", annotator="x"),
            dict(kind="stars", completion_id=a, stars=5, annotator="x"),
            dict(kind="stars", completion_id=c, stars=2, annotator="x"),
            dict(kind="ranking", ranking=[c, b, a], annotator="y", session_id="s1"),
            dict(kind="thumbs", completion_id=d, up=True, annotator="z"),
            dict(kind="thumbs", completion_id=e, up=False, tags=["off-topic"], annotator="z"),
            dict(kind="critique", completion_id=d, text="  too short  ", annotator="z"),
            dict(kind="pairwise", completion_id=b, other_completion_id=a, winner="a", annotator="x",
                 idempotency_key="k1")]                    # supersedes the first label (same unordered pair)
    rows = rows * 40                                       # > 255 rows: several INSERTs in one transaction
    for i, r in enumerate(rows):
        if "idempotency_key" in r:
            rows[i] = {**r, "idempotency_key": f"k{i}"}
    ids = add_feedback_many(st, rows)
    assert len(ids) == len(rows) and ids == sorted(ids) and len(set(ids)) == len(ids)
    # the same labels one by one in another file give the same current labels and pairs
    one = Store(tmp_path / "one.duckdb")
    try:
        _prompt(one, "Name a fruit", 3)
        _prompt(one, "Say hi", 2)
        for r in rows:
            one.add_feedback(**r)
        cols = ["prompt_id", "chosen_id", "rejected_id", "margin", "kind", "feedback_id", "pair_key", "heldout"]
        assert st.preference_pairs()[cols].equals(one.preference_pairs()[cols])
        assert st.pair_conflicts() == one.pair_conflicts()
        f1, f2 = st.feedback(), one.feedback()
        for col in ("id", "kind", "prompt_id", "completion_id", "other_completion_id", "stars", "up", "winner",
                    "ranking", "text", "tags", "annotator", "session_id", "idempotency_key", "source"):
            assert f1[col].astype(str).tolist() == f2[col].astype(str).tolist(), col
    finally:
        one.close()
    # an idempotency key already stored: not added again, its id returned
    again = add_feedback_many(st, [dict(kind="stars", completion_id=b, stars=3, idempotency_key="k7"),
                                   dict(kind="stars", completion_id=b, stars=4)])
    assert again[0] == ids[7] and again[1] > ids[-1]
    n = st.stats()["feedback"]
    bad = [
        [dict(kind="stars", completion_id=a, stars=3), dict(kind="stars", completion_id=a, stars=9)],
        [dict(kind="pairwise", completion_id=a, other_completion_id=d, winner="a")],      # two prompts
        [dict(kind="stars", completion_id=a, stars=3, criterion="nope")],
        [dict(kind="rewrite", completion_id=a, rewrite_text="x")],
        [dict(kind="stars", completion_id=a, stars=3, up=True)],
        [dict(kind="stars", completion_id=a, stars=3, idempotency_key="q"),
         dict(kind="stars", completion_id=b, stars=3, idempotency_key="q")],
    ]
    for rs in bad:
        with pytest.raises(InvalidInput):
            add_feedback_many(st, rs)
    with pytest.raises(NotFound, match="Label 2"):
        add_feedback_many(st, [dict(kind="stars", completion_id=a, stars=3),
                               dict(kind="stars", completion_id=99999, stars=3)])
    assert st.stats()["feedback"] == n                       # nothing written by a failed batch
    assert add_feedback_many(st, []) == []


# ------------------------------------------------------------------------------------- in the Studio

@pytest.mark.slow
def test_incremental_refit_in_the_studio_matches_the_full_refit(studio):
    """Enough pairs for the primal regime (rankings by many annotators of a few real completions): the
    incremental refit (the default) and the full refit give the same scores, metrics and conflicts."""
    from rlhf_studio.storage.io.bulk import add_feedback_many
    s = studio
    groups = [[c.id for c in s.generate(p, n=4, max_new_tokens=6, seed=i)]
              for i, p in enumerate(["Name a fruit.", "Say hello.", "Name a colour."])]
    rng = np.random.default_rng(0)
    rows = [dict(kind="ranking", ranking=[int(x) for x in rng.permutation(g)], annotator=f"a{k}")
            for k in range(150) for g in groups]
    rows += [dict(kind="pairwise", completion_id=groups[0][0], other_completion_id=groups[0][1], winner="b",
                  annotator=f"a{k}") for k in range(150, 200)]
    add_feedback_many(s.store, rows)
    ids = [i for g in groups for i in g]
    assert s.reward.settings.fast_refit == "incremental"
    s.rate(groups[1][0], 5)                                      # a label through the API: incremental refit
    inc = s.reward.fast
    inc_metrics = s.reward_metrics().iloc[-1]
    assert inc.n_pairs > 0.75 * inc.n_features                   # the primal (incremental) regime
    assert s.reward.last_refit["total"] > 0
    s.reward.settings.fast_refit = "full"
    s.reward.refit_fast()
    full = s.reward.fast
    full_metrics = s.reward_metrics().iloc[-1]
    X = np.stack([s.reward.features(ids)[i] for i in ids])
    assert np.abs(inc.score(X)[0] - full.score(X)[0]).max() < 1e-4 * max(1.0, np.abs(full.score(X)[0]).max())
    assert np.allclose(inc.score(X)[1], full.score(X)[1], rtol=1e-3)
    for k in ("heldout_accuracy", "heldout_loss", "heldout_pairs", "train_pairs", "conflicts", "l2"):
        assert inc_metrics[k] == pytest.approx(full_metrics[k], rel=1e-4), k
    assert inc_metrics["conflicts"] == s.store.pair_conflicts() > 0
    # back to incremental: warm-started from the full model, same answer again
    s.reward.settings.fast_refit = "incremental"
    s.reward.refit_fast()
    assert np.abs(s.reward.fast.score(X)[0] - full.score(X)[0]).max() < 1e-4 * max(1.0, np.abs(full.score(X)[0]).max())
    vis = s.reward.visible_scores(groups[2])
    assert all(v is not None and v[2].startswith("fast v") for v in vis)
