"""Dashboards: the statistics against hand-computed / published values, the SQL aggregates against the
`feedback_current` view and Store's own counts, every figure on an empty and a filled database, the tab's
loader, and the benchmark's data builder (small)."""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from rlhf_studio.storage import Store
from rlhf_studio.storage import reports as q
from rlhf_studio.studio import dashboards as d

NAN = float("nan")
# Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders x 12 units, values 1..5, missing.
KRIPP = [[1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
         [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
         [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
         [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN]]


# ------------------------------------------------------------------------------------------------ statistics
def test_cohen_kappa_hand_computed():
    # p_o = 35/50 = .7, p_e = (25*30 + 25*20)/2500 = .5 -> kappa = .4
    assert d.cohen_kappa([[20, 5], [10, 15]]) == pytest.approx(0.4)
    m = [[2, 1, 0], [0, 2, 1], [0, 0, 2]]
    # p_o = 6/8, p_e = (3*2 + 3*3 + 2*3)/64 = 21/64
    assert d.cohen_kappa(m) == pytest.approx((6 / 8 - 21 / 64) / (1 - 21 / 64))
    # sum(w O) = 2; sum(w E): linear 7.0, quadratic 10.25
    assert d.cohen_kappa(m, "linear") == pytest.approx(1 - 2 / 7)
    assert d.cohen_kappa(m, "quadratic") == pytest.approx(1 - 2 / 10.25)
    # empty categories change nothing; perfect agreement is 1; no variation is undefined
    assert d.cohen_kappa(np.pad(np.array([[20, 5], [10, 15]]), (0, 3))) == pytest.approx(0.4)
    assert d.cohen_kappa([[3, 0], [0, 4]]) == pytest.approx(1.0)
    assert math.isnan(d.cohen_kappa([[5, 0], [0, 0]]))


def test_krippendorff_alpha_hand_computed_and_published():
    # 2 coders, units (1,1), (2,2), (3,2): o = [[2,0,0],[0,2,1],[0,1,0]], n_c = [2,3,1], n = 6
    vals, o = d.coincidence_matrix([[1, 2, 3], [1, 2, 2]])
    assert o.tolist() == [[2, 0, 0], [0, 2, 1], [0, 1, 0]]
    assert d.krippendorff_alpha(o, vals, "interval") == pytest.approx(1 - 5 * 2 / 34)   # 0.70588
    assert d.krippendorff_alpha(o, vals, "nominal") == pytest.approx(1 - 5 * 2 / 22)    # 0.54545
    # the published values of Krippendorff's worked example
    vals, o = d.coincidence_matrix(KRIPP)
    assert d.krippendorff_alpha(o, vals, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert d.krippendorff_alpha(o, vals, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert d.krippendorff_alpha(o, vals, "interval") == pytest.approx(0.849, abs=5e-4)
    assert math.isnan(d.krippendorff_alpha(np.zeros((5, 5)), range(1, 6), "interval"))


def test_bradley_terry_fisher_interval():
    # 30 wins, 10 losses: MLE theta = ln 3; Fisher information n p (1-p) = 40 * .75 * .25 = 7.5
    theta, se = d.bradley_terry([[0, 10], [30, 0]], prior=0.0)
    assert theta[0] == 0 and theta[1] == pytest.approx(math.log(3), abs=1e-8)
    assert se[0] == 0 and se[1] == pytest.approx(math.sqrt(1 / 7.5), abs=1e-8)
    # consistent strengths on three players are recovered exactly with enough balanced data
    true = np.array([0.0, 1.0, -0.5])
    w = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            if i != j:
                w[i, j] = 1000 / (1 + math.exp(-(true[i] - true[j])))
    theta, se = d.bradley_terry(w, prior=0.0)
    assert theta == pytest.approx(true, abs=1e-8)
    # an undefeated player stays finite with the prior
    theta, se = d.bradley_terry([[0, 0], [5, 0]], prior=0.1)
    assert np.isfinite(theta).all() and theta[1] > 2 and np.isfinite(se).all()


# ------------------------------------------------------------------------------------------------ helpers
def _prompt(st: Store, text: str, n: int, adapters=None, source="model") -> tuple[int, list[int]]:
    pid = st.add_prompt(text)
    adapters = adapters or [None] * n
    return pid, st.add_completions([{"prompt_id": pid, "text": f"{text} / {i}", "adapter_id": a, "source": source}
                                    for i, a in enumerate(adapters)])


def _kripp_store(st: Store) -> list[int]:
    """KRIPP as star labels: coder k = annotator 'c<k>', unit u = completion u."""
    _, cids = _prompt(st, "unit prompt", 12)
    for k, row in enumerate(KRIPP):
        for u, v in enumerate(row):
            if not math.isnan(v):
                st.add_feedback(kind="stars", completion_id=cids[u], stars=int(v), annotator=f"c{k}")
    return cids


# ------------------------------------------------------------------------------------------------ SQL = view
def test_current_label_sql_agrees_with_feedback_current(fresh_store):
    st = fresh_store
    st.add_criterion("style")
    _, c = _prompt(st, "p", 4)
    st.add_feedback(kind="stars", completion_id=c[0], stars=1, annotator="a")
    st.add_feedback(kind="stars", completion_id=c[0], stars=4, annotator="a")          # replaces 1
    st.add_feedback(kind="stars", completion_id=c[0], stars=2, annotator="b")
    st.add_feedback(kind="stars", completion_id=c[1], stars=5, annotator="a", criterion="style")
    st.add_feedback(kind="stars", completion_id=c[1], stars=3, annotator="a", source="import:x")
    st.add_feedback(kind="pairwise", completion_id=c[0], other_completion_id=c[1], winner="a", annotator="a")
    st.add_feedback(kind="pairwise", completion_id=c[1], other_completion_id=c[0], winner="tie", annotator="a")
    st.add_feedback(kind="pairwise", completion_id=c[2], other_completion_id=c[3], winner="b", annotator="a")
    pw_b = st.add_feedback(kind="pairwise", completion_id=c[3], other_completion_id=c[2], winner="a", annotator="b")

    def agree():
        for crit in (None, "overall", "style"):
            sql, params = q.current_stars_sql(crit)
            mine = st.query(f"SELECT id, stars, source FROM ({sql}) ORDER BY id", params)
            view = st.query("SELECT id, stars, source FROM feedback_current WHERE kind = 'stars' AND (? IS NULL "
                            "OR criterion = ?) ORDER BY id", [crit, crit])
            assert mine.values.tolist() == view.values.tolist()
            sql, params = q.current_pairwise_sql(crit)
            mine = st.query(f"SELECT id, winner, winner_id FROM ({sql}) ORDER BY id", params)
            view = st.query("SELECT id, winner, CASE winner WHEN 'a' THEN completion_id WHEN 'b' THEN "
                            "other_completion_id END AS winner_id FROM feedback_current WHERE kind = 'pairwise' "
                            "AND (? IS NULL OR criterion = ?) ORDER BY id", [crit, crit])
            assert mine.astype(str).values.tolist() == view.astype(str).values.tolist()
        return len(st.query("SELECT * FROM feedback_current"))
    n_current = agree()
    # the replaced pairwise 'a' is now a tie (a NULL winner_id must not fall back to the older label)
    sql, params = q.current_pairwise_sql("overall")
    assert st.query(f"SELECT winner FROM ({sql}) WHERE lo = ? AND hi = ? ", params + [c[0], c[1]])[
        "winner"].tolist() == ["tie"]
    dist = q.star_distribution(st)
    assert dist.values.tolist() == [["overall", "human", 2, 1], ["overall", "human", 4, 1],
                                    ["overall", "imported", 3, 1], ["style", "human", 5, 1]]
    # withdrawn labels leave both, and the labels they had replaced come back in both
    st.retract_feedback(st.feedback(kind="stars", annotator="a").query("stars == 4")["id"].item())
    st.retract_feedback(st.feedback(kind="pairwise", annotator="a").query("winner == 'tie'")["id"].item())
    st.retract_feedback(pw_b, annotator="b")
    assert agree() == n_current - 1
    assert st.query(f"SELECT winner FROM ({sql}) WHERE lo = ? AND hi = ? ", params + [c[0], c[1]])[
        "winner"].tolist() == ["a"]
    assert q.star_distribution(st, "overall").values.tolist() == [
        ["overall", "human", 1, 1], ["overall", "human", 2, 1], ["overall", "imported", 3, 1]]


def test_coverage_counts_match_store_prompts(fresh_store):
    st = fresh_store
    p1, c1 = _prompt(st, "first", 3)
    p2, c2 = _prompt(st, "second", 2)
    p3, _ = _prompt(st, "third", 1)
    st.add_prompt("no completions")
    st.add_feedback(kind="stars", completion_id=c1[0], stars=3)
    st.add_feedback(kind="stars", completion_id=c1[0], stars=4)      # replaced: still one label
    st.add_feedback(kind="thumbs", completion_id=c1[1], up=True)
    st.add_feedback(kind="ranking", ranking=[c1[2], c1[0], c1[1]])
    st.add_feedback(kind="ranking", ranking=[c1[0], c1[2], c1[1]])   # replaced
    st.add_feedback(kind="pairwise", completion_id=c2[0], other_completion_id=c2[1], winner="a")
    st.add_feedback(kind="pairwise", completion_id=c2[1], other_completion_id=c2[0], winner="b")   # replaced
    st.add_rewrite(c2[0], "better")
    st.add_feedback(kind="critique", completion_id=c2[1], text="meh", annotator="x")
    hist, low = q.coverage(st, fewest=10, cap=3)
    n_labels = st.prompts().set_index("id")["n_labels"]
    assert dict(zip(low["id"], low["n"])) == {int(k): int(v) for k, v in n_labels.items()}
    assert low["n"].tolist() == sorted(low["n"].tolist())
    assert hist.values.tolist() == [[0, 2], [3, 2]]   # p3, 'no completions': 0; p1 3 labels; p2 3 ('3+')
    fig = d.coverage(st, fewest=10, cap=3)
    assert isinstance(fig, go.Figure) and "2 without a label" in fig.layout.title.text


def test_labels_over_time_counts(fresh_store):
    st = fresh_store
    _, c = _prompt(st, "p", 2)
    for i in range(5):
        st.add_feedback(kind="stars", completion_id=c[i % 2], stars=1 + i, annotator=f"a{i % 3}")
    st.add_feedback(kind="thumbs", completion_id=c[0], up=True, annotator="a0")
    df = q.labels_over_time(st, "hour", top_annotators=2)
    kinds = df[df["dim"] == "kind"].groupby("grp")["n"].sum().to_dict()
    assert kinds == {"stars": 5, "thumbs": 1}
    who = df[df["dim"] == "annotator"].groupby("grp")["n"].sum().to_dict()
    assert who == {"a0": 3, "a1": 2, "(other)": 1}
    fig = d.labels_over_time(st)
    assert sum(sum(t.y) for t in fig.data if t.legendgroup == "kind") == 6
    # all six labels fall in one hour: the bars are an hour wide and the axis spans hours, not the millisecond
    # plotly picks for a single x value (ticks at 19:59:59.9996 in a screenshot)
    lo, hi = (pd.Timestamp(v) for v in fig.layout.xaxis.range)
    assert hi - lo >= pd.Timedelta(2, "h")
    assert all(t.width == pytest.approx(0.9 * 3600e3) for t in fig.data)
    assert all(pd.Timestamp(x).minute == 30 for t in fig.data for x in t.x)     # each bar over its own hour


# ------------------------------------------------------------------------------------------------ agreement (SQL)
def test_agreement_through_sql_matches_published_alpha(fresh_store):
    st = fresh_store
    _kripp_store(st)
    co, _ = q.star_agreement(st)
    o = np.zeros((5, 5))
    for r in co.itertuples():
        o[r.c - 1, r.k - 1] = r.o
    _, ref = d.coincidence_matrix(KRIPP, values=[1, 2, 3, 4, 5])
    assert o == pytest.approx(ref)
    s = d.agreement_stats(st)
    assert s["stars_alpha_nominal"] == pytest.approx(0.743, abs=5e-4)
    assert s["stars_alpha_ordinal"] == pytest.approx(0.815, abs=5e-4)
    assert s["stars_alpha_interval"] == pytest.approx(0.849, abs=5e-4)
    # Cohen's kappa per pair of coders equals kappa on their shared units
    k = s["kappa"].set_index(["a1", "a2"])
    a, b = np.array(KRIPP[0]), np.array(KRIPP[1])
    both = ~np.isnan(a) & ~np.isnan(b)
    m = np.zeros((5, 5))
    for x, y in zip(a[both], b[both]):
        m[int(x) - 1, int(y) - 1] += 1
    assert k.loc[("c0", "c1"), "n"] == both.sum()
    assert k.loc[("c0", "c1"), "kappa"] == pytest.approx(d.cohen_kappa(m))


def test_two_annotator_kappa_and_pairwise_agreement(fresh_store):
    st = fresh_store
    _, c = _prompt(st, "p", 50)
    # confusion [[20, 5], [10, 15]] on stars 1 / 5 -> kappa .4
    cells = [(1, 1)] * 20 + [(1, 5)] * 5 + [(5, 1)] * 10 + [(5, 5)] * 15
    for cid, (x, y) in zip(c, cells):
        st.add_feedback(kind="stars", completion_id=cid, stars=x, annotator="ann")
        st.add_feedback(kind="stars", completion_id=cid, stars=y, annotator="bob")
    # pairwise: agree on 2 pairs (one with the sides swapped), disagree on 1
    st.add_feedback(kind="pairwise", completion_id=c[0], other_completion_id=c[1], winner="a", annotator="ann")
    st.add_feedback(kind="pairwise", completion_id=c[1], other_completion_id=c[0], winner="b", annotator="bob")
    st.add_feedback(kind="pairwise", completion_id=c[2], other_completion_id=c[3], winner="b", annotator="ann")
    st.add_feedback(kind="pairwise", completion_id=c[2], other_completion_id=c[3], winner="b", annotator="bob")
    st.add_feedback(kind="pairwise", completion_id=c[4], other_completion_id=c[5], winner="a", annotator="ann")
    st.add_feedback(kind="pairwise", completion_id=c[4], other_completion_id=c[5], winner="b", annotator="bob")
    st.add_feedback(kind="pairwise", completion_id=c[6], other_completion_id=c[7], winner="a", annotator="ann")
    s = d.agreement_stats(st)
    row = s["kappa"].iloc[0]
    assert (row["a1"], row["a2"], row["n"]) == ("ann", "bob", 50)
    assert row["kappa"] == pytest.approx(0.4)
    assert row["exact_agreement"] == pytest.approx(0.7)
    # o(lo,lo) = 2, o(hi,hi) = 2, o(lo,hi) = o(hi,lo) = 1: alpha = 1 - 5 * 2 / 18, agreement 4/6
    assert s["pairwise_pairable"] == 6
    assert s["pairwise_alpha_nominal"] == pytest.approx(1 - 10 / 18)
    assert s["pairwise_agreement"] == pytest.approx(4 / 6)
    fig = d.agreement(st)
    assert isinstance(fig, go.Figure) and any(isinstance(t, go.Heatmap) for t in fig.data)


# ------------------------------------------------------------------------------------------------ leaderboard
def test_leaderboard_votes_and_bt(fresh_store):
    st = fresh_store
    a1 = st.add_adapter("ppo-a", b"w", {}, "base/model")
    a2 = st.add_adapter("ppo-b", b"w", {}, "base/model")
    votes = []  # (left adapter, right adapter, winner)
    votes += [(a1, None, "a")] * 6 + [(None, a1, "a")] * 2 + [(a1, None, "tie")] * 2      # a1 vs base: 6-2-2
    votes += [(a2, a1, "b")] * 3 + [(a2, a1, "a")] * 1 + [(a2, a1, "both_bad")] * 1      # a1 vs a2: 3-1-1
    for i, (x, y, w) in enumerate(votes):
        _, c = _prompt(st, f"blind {i}", 2, adapters=[x, y])
        st.add_feedback(kind="pairwise", completion_id=c[0], other_completion_id=c[1], winner=w, annotator=f"u{i}")
    # ignored: same policy on both sides, a human rewrite (adapter NULL but not the base model), replaced votes
    _, c = _prompt(st, "same", 2, adapters=[a1, a1])
    st.add_feedback(kind="pairwise", completion_id=c[0], other_completion_id=c[1], winner="a")
    _, c = _prompt(st, "human", 1, adapters=[a2])
    _, h = st.add_rewrite(c[0], "human text")
    st.add_feedback(kind="pairwise", completion_id=h, other_completion_id=c[0], winner="a")
    v = q.policy_votes(st)
    assert v[["p1", "p2", "name1", "name2", "wins1", "wins2", "ties", "both_bad"]].values.tolist() == [
        [0, a1, "base", f"ppo-a #{a1}", 2, 6, 2, 0], [a1, a2, f"ppo-a #{a1}", f"ppo-b #{a2}", 3, 1, 0, 1]]
    t = d.leaderboard_table(st, prior=0.0).set_index("policy")
    assert t.loc["base", "rating"] == pytest.approx(d.ELO_BASE)
    assert t.loc[f"ppo-a #{a1}", ["votes", "wins", "losses", "ties"]].tolist() == [15, 9, 3, 3]
    assert t.loc[f"ppo-a #{a1}", "win_rate"] == pytest.approx((9 + 1.5) / 15)
    assert list(t.index) == [f"ppo-a #{a1}", "base", f"ppo-b #{a2}"] or \
        list(t.index) == [f"ppo-a #{a1}", f"ppo-b #{a2}", "base"]
    # the MLE of the same win matrix, ties as half wins
    w = np.array([[0, 2 + 1, 0], [6 + 1, 0, 3 + 0.5], [0, 1 + 0.5, 0]])
    theta, se = d.bradley_terry(w, prior=0.0)
    assert t.loc[f"ppo-a #{a1}", "theta"] == pytest.approx(theta[1])
    assert t.loc[f"ppo-a #{a1}", "ci_high"] - t.loc[f"ppo-a #{a1}", "rating"] == \
        pytest.approx(1.96 * d.ELO_SCALE * se[1])
    assert len(q.policy_votes(st, blind_only=True)) == 0   # none of these prompts came from the Blind tab
    fig = d.leaderboard(st)
    assert isinstance(fig, go.Figure) and len(fig.data[0].y) == 3
    # the Blind compare tab's win rates (Studio.policy_winrates) are the leaderboard's counts, by the same names
    r = d.policy_record(st, criterion=None)
    assert r.policy.tolist() == ["base", f"ppo-a #{a1}", f"ppo-b #{a2}"]
    cols = ["votes", "wins", "losses", "ties", "win_rate"]
    assert r.set_index("policy")[cols].equals(t[cols].loc[r.policy]), (r, t)


# ------------------------------------------------------------------------------------------------ reward vs stars
def test_reward_vs_stars(fresh_store):
    st = fresh_store
    _, c = _prompt(st, "p", 6)
    stars = [1, 2, 3, 4, 5, 5]
    for cid, s in zip(c, stars):
        st.add_feedback(kind="stars", completion_id=cid, stars=s, annotator="a")
    st.add_feedback(kind="stars", completion_id=c[0], stars=3, annotator="b")      # mean 2 for c[0]
    scores = pd.DataFrame({"id": c + [999], "score": [0.1, 0.5, 0.4, 0.9, 1.2, 1.0, 7.0]})
    points, stats, bins = q.stars_vs_scores(st, scores)
    means = np.array([2, 2, 3, 4, 5, 5], dtype=float)
    sc = np.array([0.1, 0.5, 0.4, 0.9, 1.2, 1.0])
    assert stats["n"] == 6 and len(points) == 6
    assert stats["pearson"] == pytest.approx(np.corrcoef(sc, means)[0, 1])
    rank = lambda x: pd.Series(x).rank(method="average").to_numpy()  # noqa: E731
    assert stats["spearman"] == pytest.approx(np.corrcoef(rank(sc), rank(means))[0, 1])
    assert bins["stars"].tolist() == [2, 3, 4, 5] and bins["n"].tolist() == [2, 1, 1, 2]
    fig = d.reward_vs_stars(st, pd.Series(sc, index=c))
    assert "Pearson r = " in fig.layout.title.text
    assert isinstance(d.reward_vs_stars(st, {}), go.Figure)  # empty scores: an explanatory empty figure
    assert q.rated_completion_ids(st)[:1] == [c[0]]


# ------------------------------------------------------------------------------------------------ figures, tab
FIGS = [lambda st: d.labels_over_time(st), lambda st: d.star_distribution(st), lambda st: d.coverage(st),
        lambda st: d.reward_vs_stars(st, pd.DataFrame({"id": [1, 2], "score": [0.0, 1.0]})),
        lambda st: d.agreement(st), lambda st: d.leaderboard(st)]


@pytest.mark.parametrize("make", FIGS)
def test_every_figure_on_an_empty_database(fresh_store, make):
    fig = make(fresh_store)
    assert isinstance(fig, go.Figure)
    fig.to_json()


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_dashboards.py")
    spec = importlib.util.spec_from_file_location("bench_dashboards", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_builder_and_every_figure(tmp_path):
    path = str(tmp_path / "bench.duckdb")
    counts = _bench().build(path, 4000)
    assert counts["feedback"] == 4000
    with Store(path) as st:
        assert st.stats()["feedback"] == 4000
        # the builder leaves a valid database: sequences past the ids, pairs compile
        pid = st.add_prompt("a new prompt after the bulk load")
        assert pid == counts["prompts"] + 1
        assert len(st.preference_pairs()) > 0
        for make in FIGS:
            fig = make(st)
            assert isinstance(fig, go.Figure) and len(fig.data) > 0
        assert len(d.leaderboard_table(st)) == 4
        assert d.agreement_stats(st)["stars_alpha_interval"] > 0.3


def test_dashboard_tab_loads(fresh_store):
    gr = pytest.importorskip("gradio")
    from rlhf_studio.studio.ui import dashboard

    _kripp_store(fresh_store)

    class FakeStudio:  # the tab reads two facade methods: the criteria and the dashboard (no reward model here)
        def criteria(self):
            return fresh_store.criteria()

        def dashboard(self, criterion=None, blind_only=False, hide_policies=False):
            from rlhf_studio.studio import views
            return views.dashboard(fresh_store, None, criterion, blind_only, hide_policies)

    with gr.Blocks():
        hooks = dashboard.build(FakeStudio(), "owner")
    fn, inputs, outputs = hooks["on_load"]
    out = fn("overall", False)
    assert len(out) == len(outputs) == 9
    assert "labels" in out[0] and "α" in out[0]
    assert all(isinstance(f, go.Figure) for f in out[1:7])


def test_training_curves_tick_at_whole_steps_and_labels():
    """Steps and label counts are whole numbers: plotly's automatic ticks put 1.5 between steps 1 and 2 (seen in
    the Train tab's screenshot); the curves tick at 1, 2 or 5 times a power of ten, about 8 ticks at most."""
    from rlhf_studio.studio import plots
    steps = pd.DataFrame({"step": [1, 2, 3], "reward_mean": [0.1, 0.2, 0.3], "reward_std": [0.1, 0.1, 0.1],
                          "kl": [0.0, 0.01, 0.02]})
    fig = plots.ppo_curves(steps)
    axes = [fig.layout[k] for k in fig.layout if k.startswith("xaxis")]
    assert len(axes) == 8 and all(ax.dtick == 1 and ax.tick0 == 0 for ax in axes)
    labels = pd.DataFrame({"labels_seen": [10, 40, 130], "heldout_accuracy": [0.5, 0.6, 0.7],
                           "heldout_loss": [0.7, 0.6, 0.5], "tier": ["fast"] * 3})
    assert plots.reward_curves(labels).layout.xaxis.dtick == 20
    # the step follows the range, not the largest value: 120..132 labels seen gets ticks 2 apart (a step of 20
    # left this axis without a single tick, seen on the Reward tab)
    late = labels.assign(labels_seen=[120, 126, 132])
    assert plots.reward_curves(late).layout.xaxis.dtick == 2
