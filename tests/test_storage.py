"""storage.Store on real DuckDB files (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import duckdb
import numpy as np
import pandas as pd
import pytest

from rlhf_studio import storage
from rlhf_studio.storage import InvalidInput, NotFound, StorageError, Store
from rlhf_studio.storage.migrations import LATEST_VERSION, MIGRATIONS


# ------------------------------------------------------------------------------------------------ helpers
def _prompt_with(st: Store, text: str, n: int) -> tuple[int, list[int]]:
    pid = st.add_prompt(text)
    cids = st.add_completions([{"prompt_id": pid, "text": f"{text} / answer {i}"} for i in range(n)])
    return pid, cids


def _pairs(st: Store, criterion="overall") -> list[tuple]:
    df = st.preference_pairs(criterion)
    return sorted((int(r.chosen_id), int(r.rejected_id), float(r.margin), r.kind) for r in df.itertuples())


# ------------------------------------------------------------------------------------------------ schema
def test_api_surface():
    assert issubclass(InvalidInput, ValueError)
    assert issubclass(NotFound, LookupError)
    assert issubclass(InvalidInput, StorageError) and issubclass(NotFound, StorageError)
    assert str(NotFound("no completion with id 3")) == "no completion with id 3"


def test_migrations_from_empty_file_and_reopen_is_noop(tmp_path):
    path = tmp_path / "new.duckdb"
    with Store(path) as st:
        assert st.path == os.path.realpath(path)
        assert st.schema_version() == LATEST_VERSION
        assert st.criteria().name.tolist() == ["overall"]
    with Store(path) as st:  # re-open: nothing applied again, seed not duplicated
        assert st.query("SELECT version FROM schema_version ORDER BY version").version.tolist() == \
            [v for v, _ in MIGRATIONS]
        assert len(st.criteria()) == 1
    con = duckdb.connect(str(path))
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert set(storage.store.TABLES) | {"schema_version"} <= tables
        assert {"feedback_current", "feedback_history", "preference_pairs"} <= views
        # the schema itself enforces the rules, not only the Python checks
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO criteria (name) VALUES ('bad/name')")
        con.execute("INSERT INTO prompts (text) VALUES ('p')")
        con.execute("INSERT INTO completions (prompt_id, text) VALUES (1, 'c')")
        for bad in ("kind, prompt_id, completion_id, stars) VALUES ('stars', 1, 1, 6)",
                    "kind, prompt_id, completion_id, winner, other_completion_id) VALUES ('pairwise', 1, 1, 'a', 1)",
                    "kind, prompt_id, completion_id) VALUES ('likes', 1, 1)",
                    "kind, prompt_id, completion_id, stars) VALUES ('stars', 1, 99, 3)"):
            with pytest.raises(duckdb.ConstraintException):
                con.execute("INSERT INTO feedback (" + bad)
    finally:
        con.close()


def test_memory_store_and_utc_timestamps():
    with Store(":memory:") as st:
        pid = st.add_prompt("hi")
        created = st.prompts().set_index("id").loc[pid, "created_at"].to_pydatetime()
        now_utc = datetime.now(timezone.utc).replace(tzinfo=None)
        assert abs(created - now_utc) < timedelta(minutes=1)


# ------------------------------------------------------------------------------------------------ round trips
def test_every_table_round_trips_across_reopen(tmp_path):
    path = tmp_path / "rt.duckdb"
    with Store(path) as st:
        st.add_criterion("helpfulness", "Does it help?")
        st.add_criterion("helpfulness", "Does it really help?")  # upsert
        run = st.create_run("ppo", {"lr": 1e-5}, {"reward_version": 1})
        adapter = st.add_adapter("ppo-step-3", b"\x00LoRA", {"r": 8}, "Qwen/Qwen2.5-0.5B", "abc123",
                                 run_id=run, step=3)
        pid = st.add_prompt("  Write a haiku.  ")
        (c1, c2) = st.add_completions([
            {"prompt_id": pid, "text": "Leaves fall", "source": "model", "model_id": "m", "model_revision": "r1",
             "adapter_id": adapter, "params": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64},
             "seed": 42, "prompt_tokens": 5, "completion_tokens": 3, "finish_reason": "eos", "latency_s": 0.25},
            {"prompt_id": pid, "text": "Snow", "finish_reason": "length"},
        ])
        st.add_feedback(kind="stars", completion_id=c1, stars=4, criterion="helpfulness", annotator="ann",
                        session_id="s1")
        st.add_feedback(kind="thumbs", completion_id=c2, up=False, tags=["too short", "off-topic"])
        st.add_feedback(kind="critique", completion_id=c2, text="  Too short.  ")
        fb, c3 = st.add_rewrite(c2, "Snow on the pine branch", annotator="ann")
        st.put_features("rev-1", [c1, c2], np.arange(8, dtype=np.float64).reshape(2, 4))
        v1 = st.add_reward_version("fast", "overall", {"l2": 0.1}, ["1-2"], 1, {"heldout_accuracy": 0.5}, b"w1")
        v2 = st.add_reward_version("deep", {"overall": 1.0, "helpfulness": 0.5}, {}, [], 2,
                                   {"heldout_accuracy": 0.75, "heldout_loss": 0.5, "heldout_pairs": 4,
                                    "train": {"loss": 0.25}}, b"w2", parent_id=v1)
        st.add_run_metrics(run, 0, {"reward": 0.1, "kl": 0.0})
        st.add_run_metrics(run, 1, {"reward": np.float32(0.5)})
        st.add_run_samples(run, 1, [{"prompt": "p", "response": "r", "reward": 0.5}])
        st.put_checkpoint(run, 1, b"state-1")
        st.set_run_status(run, "failed", error="CUDA out of memory")

    with Store(path) as st:
        assert st.criteria().set_index("name").loc["helpfulness", "description"] == "Does it really help?"
        p = st.prompts()
        assert p.text.tolist() == ["Write a haiku."] and p.n_completions.tolist() == [3]
        assert p.n_labels.tolist() == [4]
        got = st.get_completion(c1)
        assert got["params"] == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}
        assert (got["seed"], got["adapter_id"], got["finish_reason"], got["latency_s"]) == (42, adapter, "eos", 0.25)
        assert isinstance(got["created_at"], datetime)
        human = st.get_completion(c3)
        assert (human["source"], human["corrects_id"], human["finish_reason"]) == ("human", c2, "human")
        assert st.completions(pid).id.tolist() == [c1, c2, c3]
        f = st.feedback()
        assert f.kind.tolist() == ["stars", "thumbs", "critique", "rewrite"]
        row = f.set_index("kind")
        assert row.loc["stars", "criterion"] == "helpfulness" and row.loc["stars", "session_id"] == "s1"
        assert list(row.loc["thumbs", "tags"]) == ["too short", "off-topic"]
        assert row.loc["critique", "text"] == "Too short." and row.loc["thumbs", "annotator"] == "local"
        assert row.loc["rewrite", "rewrite_completion_id"] == c3 and row.loc["rewrite", "id"] == fb
        assert (f.prompt_id == pid).all()
        feats = st.get_features("rev-1", [c1, c2, c3])
        assert set(feats) == {c1, c2} and feats[c2].dtype == np.float32
        np.testing.assert_array_equal(feats[c2], [4, 5, 6, 7])
        assert st.get_features("other-rev", [c1]) == {}
        rv = st.reward_versions()
        assert "weights" not in rv.columns and rv.id.tolist() == [v1, v2]
        rec = st.reward_version(v2)
        assert rec["weights"] == b"w2" and rec["parent_id"] == v1 and json.loads(rec["criterion"])["helpfulness"] == 0.5
        m = st.reward_metrics()
        assert list(m.columns[:7]) == ["version", "tier", "criterion", "labels_seen", "heldout_accuracy",
                                       "heldout_loss", "heldout_pairs"]
        assert "train.loss" in m.columns and m.columns[-1] == "created_at"
        assert m.heldout_accuracy.tolist() == [0.5, 0.75] and np.isnan(m.heldout_loss[0])
        r = st.run(run)
        assert (r["status"], r["error"], r["config"], r["lineage"]) == ("failed", "CUDA out of memory",
                                                                         {"lr": 1e-5}, {"reward_version": 1})
        assert st.runs().id.tolist() == [run]
        wide = st.run_metrics(run)
        assert wide.step.tolist() == [0, 1] and wide.reward.tolist() == [0.1, 0.5]
        assert wide.kl[0] == 0.0 and np.isnan(wide.kl[1])
        assert st.run_samples(run)[["step", "prompt", "response", "reward"]].values.tolist() == [[1, "p", "r", 0.5]]
        assert st.latest_checkpoint(run) == (1, b"state-1")
        ad = st.adapters()
        assert "weights" not in ad.columns and ad.name.tolist() == ["ppo-step-3"]
        assert st.adapter(adapter)["weights"] == b"\x00LoRA" and st.adapter(adapter)["config"] == {"r": 8}
        stats = st.stats()
        assert stats["completions"] == 3 and stats["feedback"] == 4 and stats["checkpoints"] == 1
        for missing in (lambda: st.get_completion(999), lambda: st.run(999), lambda: st.adapter(999),
                        lambda: st.reward_version(999)):
            with pytest.raises(NotFound):
                missing()
        with pytest.raises(NotFound, match="no completion with id 999"):
            st.get_completion(999)


def test_prompts_dedupe_and_next_prompt(fresh_store):
    st = fresh_store
    a, b, a2 = st.add_prompts(["alpha", "beta", " alpha"])
    assert a == a2 and st.add_prompt("beta") == b and len(st.prompts()) == 2
    with pytest.raises(InvalidInput):
        st.add_prompt("   ")
    with pytest.raises(InvalidInput, match="Prompt 2"):
        st.add_prompts(["ok", ""])
    assert len(st.prompts()) == 2  # nothing of the failed batch was written
    c = st.add_completions([{"prompt_id": a, "text": "x"}, {"prompt_id": b, "text": "y"}])
    assert st.next_prompt() == {"id": a, "text": "alpha"}
    st.add_feedback(kind="stars", completion_id=c[0], stars=3, annotator="ann")
    assert st.next_prompt()["id"] == b  # fewest labels
    st.add_feedback(kind="stars", completion_id=c[1], stars=3, annotator="bob")
    st.add_feedback(kind="stars", completion_id=c[1], stars=4, annotator="carl")
    assert st.next_prompt()["id"] == a
    assert st.next_prompt(annotator="ann")["id"] == b  # ann has not labelled beta yet
    assert Store(":memory:").next_prompt() is None


# ------------------------------------------------------------------------------------------------ labels
def test_label_history_and_current(fresh_store):
    st = fresh_store
    _, (c1,) = _prompt_with(st, "p", 1)
    ids = [st.add_feedback(kind="stars", completion_id=c1, stars=s) for s in (2, 4, 5)]
    cur = st.feedback()
    assert cur.id.tolist() == [ids[-1]] and cur.stars.tolist() == [5]
    hist = st.feedback(history=True)
    assert hist.id.tolist() == ids and hist.superseded.tolist() == [True, True, False]
    # another annotator's label is a separate current label
    st.add_feedback(kind="stars", completion_id=c1, stars=1, annotator="other")
    assert sorted(st.feedback(kind="stars").stars.tolist()) == [1, 5]
    assert st.feedback(annotator="other").stars.tolist() == [1]


def test_constraints_reject_and_write_nothing(fresh_store):
    st = fresh_store
    _, (c1, c2) = _prompt_with(st, "p", 2)
    _, (d1,) = _prompt_with(st, "q", 1)
    before = st.stats()
    bad = [
        dict(kind="stars", completion_id=c1, stars=0),
        dict(kind="stars", completion_id=c1, stars=6),
        dict(kind="stars", completion_id=c1, stars=2.5),
        dict(kind="stars", completion_id=c1, stars=True),
        dict(kind="stars", completion_id=c1),
        dict(kind="stars", completion_id=c1, stars=3, up=True),  # field of another kind
        dict(kind="likes", completion_id=c1),
        dict(kind="thumbs", completion_id=c1, up="yes"),
        dict(kind="pairwise", completion_id=c1, other_completion_id=c2, winner="c"),
        dict(kind="pairwise", completion_id=c1, other_completion_id=c1, winner="a"),
        dict(kind="pairwise", completion_id=c1, other_completion_id=d1, winner="a"),  # different prompts
        dict(kind="ranking", ranking=[c1]),
        dict(kind="ranking", ranking=[c1, c1]),
        dict(kind="ranking", ranking=[c1, d1]),
        dict(kind="critique", completion_id=c1, text="   "),
        dict(kind="rewrite", completion_id=c1, rewrite_text=""),
        dict(kind="stars", completion_id=c1, stars=3, criterion="no such criterion"),
        dict(kind="stars", completion_id=c1, stars=3, criterion="bad/name"),
        dict(kind="stars", completion_id=c1, stars=3, prompt_id=999),
    ]
    for fields in bad:
        with pytest.raises(InvalidInput):
            st.add_feedback(**fields)
    for fields in (dict(kind="stars", completion_id=999, stars=3),
                   dict(kind="pairwise", completion_id=c1, other_completion_id=999, winner="a"),
                   dict(kind="ranking", ranking=[c1, 999])):
        with pytest.raises(NotFound, match="no completion with id 999"):
            st.add_feedback(**fields)
    with pytest.raises(NotFound):
        st.add_completions([{"prompt_id": 999, "text": "x"}])
    with pytest.raises(InvalidInput):
        st.add_completions([{"prompt_id": 1, "text": "x", "finish_reason": "tired"}])
    with pytest.raises(InvalidInput):
        st.add_completions([{"prompt_id": 1, "text": "x", "source": "robot"}])
    with pytest.raises(InvalidInput):
        st.add_completions([{"prompt_id": 1, "text": "ok"}, {"prompt_id": 1, "text": "x", "temperature": 1}])
    assert st.add_criterion(" qualité-2_a b ", "any script") == "qualité-2_a b"
    before["criteria"] += 1
    with pytest.raises(InvalidInput):
        st.add_criterion("", "empty")
    with pytest.raises(InvalidInput):
        st.add_criterion("x" * 65, "too long")
    with pytest.raises(InvalidInput):
        st.create_run("sft", {}, {})
    run = st.create_run("reward", {}, {})
    with pytest.raises(InvalidInput):
        st.set_run_status(run, "exploded")
    with pytest.raises(NotFound):
        st.set_run_status(999, "running")
    with pytest.raises(InvalidInput):
        st.add_reward_version("medium", "overall", {}, [], 0, {}, b"")
    after = st.stats()
    after["runs"] -= 1
    assert after == before


def test_write_verification_and_errors_cross_the_writer_thread(fresh_store):
    st = fresh_store
    with pytest.raises(StorageError, match="was not saved"):
        st._write(lambda cur: None, "the thing", lambda cur, _: False)
    # a write issued from inside a write (on the writer thread) joins that transaction instead of deadlocking
    pid = st._write(lambda cur: st.add_prompt("nested"), "outer", lambda cur, pid: True)
    assert st.prompts().id.tolist() == [pid]

    def boom(cur):
        st.add_prompt("rolled back")
        raise NotFound("no widget 7")

    with pytest.raises(NotFound, match="no widget 7"):
        st._write(boom, "boom")
    assert st.prompts().text.tolist() == ["nested"]


def test_writer_queue_full_raises_busy(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.writer, "QUEUE_SIZE", 2)
    monkeypatch.setattr(storage.writer, "BUSY_TIMEOUT_S", 0.2)
    st = Store(tmp_path / "busy.duckdb")
    gate, running = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: st._write(lambda cur: (running.set(), gate.wait(10)), "blocker"))
    blocker.start()
    assert running.wait(10)  # the writer thread is now stuck in the blocker
    deadline = time.monotonic() + 10
    waiting = [threading.Thread(target=st.add_prompt, args=(f"q{i}",)) for i in range(2)]
    for t in waiting:
        t.start()
    while not st._core._q.full():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(StorageError, match="busy"):
        st.add_prompt("one too many")
    gate.set()
    for t in [blocker, *waiting]:
        t.join()
    assert sorted(st.prompts().text) == ["q0", "q1"]
    st.close()


# ------------------------------------------------------------------------------------------------ pair compiler
def test_pairs_pairwise(fresh_store):
    st = fresh_store
    _, (a, b, c, d) = _prompt_with(st, "p", 4)
    st.add_feedback(kind="pairwise", completion_id=a, other_completion_id=b, winner="a")
    st.add_feedback(kind="pairwise", completion_id=c, other_completion_id=a, winner="b")
    st.add_feedback(kind="pairwise", completion_id=b, other_completion_id=c, winner="tie")
    st.add_feedback(kind="pairwise", completion_id=c, other_completion_id=d, winner="both_bad")
    assert _pairs(st) == [(a, b, 1.0, "pairwise"), (a, c, 1.0, "pairwise")]
    # changing the label replaces the pair (only current labels count)
    st.add_feedback(kind="pairwise", completion_id=b, other_completion_id=a, winner="a")
    assert _pairs(st) == [(a, c, 1.0, "pairwise"), (b, a, 1.0, "pairwise")]
    df = st.preference_pairs()
    assert list(df.columns) == ["prompt_id", "chosen_id", "rejected_id", "margin", "kind", "feedback_id",
                                "criterion", "annotator", "source", "pair_key", "heldout"]
    assert sorted(df.pair_key) == sorted([f"{min(a, b)}-{max(a, b)}", f"{min(a, c)}-{max(a, c)}"])
    assert (df.source == "human").all() and (df.annotator == "local").all()


def test_pairs_ranking(fresh_store):
    st = fresh_store
    _, (a, b, c) = _prompt_with(st, "p", 3)
    fid = st.add_feedback(kind="ranking", ranking=[b, c, a])
    assert _pairs(st) == sorted([(b, c, 1.0, "ranking"), (b, a, 1.0, "ranking"), (c, a, 1.0, "ranking")])
    assert (st.preference_pairs().feedback_id == fid).all()


def test_pairs_stars(fresh_store):
    st = fresh_store
    _, (a, b, c) = _prompt_with(st, "p", 3)
    for cid, s in ((a, 5), (b, 3), (c, 1)):
        st.add_feedback(kind="stars", completion_id=cid, stars=s)
    assert _pairs(st) == [(a, b, 2.0, "stars"), (a, c, 4.0, "stars"), (b, c, 2.0, "stars")]
    # equal stars -> no pair; another annotator, another criterion or another prompt never mix
    st.add_criterion("style", "")
    _, (x,) = _prompt_with(st, "q", 1)
    st.add_feedback(kind="stars", completion_id=x, stars=1)
    st.add_feedback(kind="stars", completion_id=b, stars=1, annotator="other")
    st.add_feedback(kind="stars", completion_id=c, stars=4, criterion="style")
    assert len(_pairs(st)) == 3 and _pairs(st, "style") == []


def test_pairs_thumbs_rewrite_critique(fresh_store):
    st = fresh_store
    _, (a, b, c) = _prompt_with(st, "p", 3)
    st.add_feedback(kind="thumbs", completion_id=a, up=True)
    st.add_feedback(kind="thumbs", completion_id=b, up=True)
    st.add_feedback(kind="thumbs", completion_id=c, up=False, tags=["wrong"])
    st.add_feedback(kind="critique", completion_id=c, text="wrong answer")
    assert _pairs(st) == [(a, c, 1.0, "thumbs"), (b, c, 1.0, "thumbs")]
    _, (d,) = _prompt_with(st, "q", 1)
    _, new = st.add_rewrite(d, "a better answer")
    assert _pairs(st)[-1] == (new, d, 1.0, "rewrite") and len(_pairs(st)) == 3


def test_pair_conflicts_and_weighted_criteria(fresh_store):
    st = fresh_store
    st.add_criterion("safety", "Is it safe?")
    _, (a, b, c) = _prompt_with(st, "p", 3)
    st.add_feedback(kind="pairwise", completion_id=a, other_completion_id=b, winner="a", annotator="x")
    st.add_feedback(kind="pairwise", completion_id=a, other_completion_id=b, winner="b", annotator="y")
    st.add_feedback(kind="pairwise", completion_id=a, other_completion_id=c, winner="a", annotator="x")
    st.add_feedback(kind="pairwise", completion_id=a, other_completion_id=c, winner="a", annotator="y")
    assert st.pair_conflicts() == 1
    assert st.pair_conflicts("safety") == 0
    st.add_feedback(kind="stars", completion_id=a, stars=5, criterion="safety")
    st.add_feedback(kind="stars", completion_id=c, stars=2, criterion="safety")
    mixed = st.preference_pairs({"overall": 1.0, "safety": 0.5})
    assert len(mixed) == 5
    assert mixed[mixed.criterion == "safety"].margin.tolist() == [1.5]
    with pytest.raises(InvalidInput):
        st.preference_pairs({"overall": -1})


def test_heldout_split_is_deterministic_and_about_20_percent(fresh_store):
    st = fresh_store
    rows = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(1000)]
    assert st.import_preference_pairs(rows, "synthetic") == 1000
    df = st.preference_pairs()
    assert len(df) == 1000 and (df.source == "import:synthetic").all()
    assert 0.15 <= df.heldout.mean() <= 0.25
    expected = [int(hashlib.md5(k.encode()).hexdigest()[:8], 16) % 5 == 0 for k in df.pair_key]
    assert df.heldout.tolist() == expected  # md5 of the pair key: stable across versions and machines
    assert st.preference_pairs().heldout.tolist() == df.heldout.tolist()


def test_import_preference_pairs(fresh_store):
    st = fresh_store
    pid = st.add_prompt("Shared prompt")
    rows = [{"prompt": "Shared prompt", "chosen": "yes", "rejected": "no"},
            {"prompt": "Other", "chosen": "A", "rejected": "B"},
            {"prompt": "Other", "chosen": "same", "rejected": "same"}]  # carries no preference: skipped
    assert st.import_preference_pairs(rows, "hh-rlhf") == 2
    assert st.import_preference_pairs(rows, "hh-rlhf") == 0  # re-import adds nothing
    p = st.prompts()
    assert len(p) == 2 and p.set_index("text").loc["Shared prompt", "id"] == pid
    comps = st.completions()
    assert len(comps) == 4 and (comps.source == "import:hh-rlhf").all()
    pairs = st.preference_pairs()
    assert [st.get_completion(int(c))["text"] for c in pairs.chosen_id] == ["yes", "A"]
    assert (pairs.annotator == "import:hh-rlhf").all() and (pairs.kind == "pairwise").all()
    with pytest.raises(InvalidInput, match="Pair 2"):
        st.import_preference_pairs([rows[0], {"prompt": "x", "chosen": 1, "rejected": "b"}], "hh")
    assert st.stats()["feedback"] == 2


def test_idempotency_key_yields_one_row(fresh_store):
    st = fresh_store
    _, (a, b) = _prompt_with(st, "p", 2)
    first = st.add_feedback(kind="stars", completion_id=a, stars=4, idempotency_key="click-1")
    again = st.add_feedback(kind="stars", completion_id=a, stars=4, idempotency_key="click-1")
    assert first == again and len(st.feedback(history=True)) == 1
    r1 = st.add_rewrite(b, "fixed", idempotency_key="rw-1")
    assert st.add_rewrite(b, "fixed", idempotency_key="rw-1") == r1
    assert st.stats()["completions"] == 3 and st.stats()["feedback"] == 2


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrent_writes_from_8_threads_lose_nothing(fresh_store):
    st = fresh_store
    _, (c,) = _prompt_with(st, "shared", 1)
    errors, ids = [], []
    lock = threading.Lock()

    def worker(t):
        try:
            for i in range(10):
                pid = st.add_prompt(f"thread {t} prompt {i}")
                fid = st.add_feedback(kind="thumbs", completion_id=c, up=bool(i % 2), annotator=f"t{t}")
                assert not st.prompts().empty  # reads interleave on per-thread cursors
                with lock:
                    ids.append((pid, fid))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({p for p, _ in ids}) == 80 and len({f for _, f in ids}) == 80
    assert st.stats()["prompts"] == 81 and st.stats()["feedback"] == 80


def test_two_stores_on_one_path_share_the_database(tmp_path):
    path = tmp_path / "shared.duckdb"
    a = Store(path)
    b = Store(str(path))
    pa = a.add_prompt("from a")
    pb = b.add_prompt("from b")
    assert a.prompts().id.tolist() == b.prompts().id.tolist() == [pa, pb]
    ro = Store(path, read_only=True)  # shares the open read-write database, refuses writes
    assert len(ro.prompts()) == 2
    with pytest.raises(StorageError, match="read-only"):
        ro.add_prompt("nope")
    a.close()
    a.close()  # idempotent
    assert b.add_prompt("after a closed") and len(b.prompts()) == 3
    ro.close()
    b.close()
    with pytest.raises(StorageError, match="closed"):
        b.prompts()
    with Store(path, read_only=True) as st:
        assert len(st.prompts()) == 3


# ------------------------------------------------------------------------------------------------ open errors
def test_file_locked_by_another_process(tmp_path):
    path = tmp_path / "locked.duckdb"
    Store(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StorageError) as err:
            Store(path)
        msg = str(err.value)
        assert str(os.path.realpath(path)) in msg and "another process" in msg and "--db" in msg
    finally:
        holder.kill()
        holder.wait()
    Store(path).close()  # free again once the other process is gone


def test_not_a_duckdb_file_and_missing_folder(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StorageError, match="junk.duckdb") as err:
        Store(junk)
    assert "not a DuckDB database" in str(err.value)
    assert junk.read_bytes()  # untouched
    with pytest.raises(StorageError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "folder.duckdb")
    with pytest.raises(StorageError, match="does not exist"):
        Store(tmp_path / "absent.duckdb", read_only=True)


# ------------------------------------------------------------------------------------------------ backup
def test_backup_during_a_stream_of_writes_is_consistent(tmp_path):
    st = Store(tmp_path / "live.duckdb")
    run = st.create_run("ppo", {}, {})
    st.put_checkpoint(run, 0, b"ckpt")
    stop = threading.Event()
    written = []

    def stream():
        i = 0
        while not stop.is_set():
            # each write adds a prompt, two completions and a label in one transaction
            st.import_preference_pairs([{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}], "stream")
            written.append(i)
            i += 1

    t = threading.Thread(target=stream)
    t.start()
    while len(written) < 5:
        time.sleep(0.01)
    target = st.backup(tmp_path / "backup.duckdb")
    n_at_backup = len(written)
    stop.set()
    t.join()
    assert st.stats()["feedback"] == len(written) > 0
    st.close()
    with Store(target) as bk:
        s = bk.stats()
        assert s["prompts"] == s["feedback"] == s["completions"] // 2
        assert 5 <= s["feedback"] <= n_at_backup + 1
        assert len(bk.preference_pairs()) == s["feedback"]
        assert bk.latest_checkpoint(run) == (0, b"ckpt")
        assert bk.add_prompt("written to the backup") > s["prompts"]  # sequences were copied too
    with pytest.raises(InvalidInput, match="already exists"):
        with Store(tmp_path / "live.duckdb") as again:
            again.backup(target)


# ------------------------------------------------------------------------------------------------ prompt files
@pytest.mark.parametrize("name,content", [
    ("p.txt", "First prompt\n\n  Second prompt  \nThird\n"),
    ("p.jsonl", '{"prompt": "First prompt"}\n\n{"text": "Second prompt", "x": 1}\n{"prompt": "Third"}\n'),
    ("p.csv", 'id,prompt\n1,First prompt\n2,"Second prompt"\n3,Third\n'),
    ("p.parquet", None),
])
def test_import_prompts_formats(fresh_store, tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pd.DataFrame({"text": ["First prompt", "Second prompt", "Third"], "n": [1, 2, 3]}).to_parquet(path)
    else:
        path.write_text(content)
    st = fresh_store
    st.add_prompt("Third")
    assert st.import_prompts(path) == 3
    p = st.prompts()
    assert sorted(p.text) == ["First prompt", "Second prompt", "Third"]
    assert set(p.source) == {"manual", f"import:{name}"}


@pytest.mark.parametrize("name,content,line", [
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "ok too"}\n{"prompt": broken}\n', "line 3"),
    ("bad.jsonl", '{"prompt": "ok"}\n["a list"]\n', "line 2"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"other": "x"}\n', "line 2"),
    ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "  "}\n', "line 3"),
    ("bad.csv", 'prompt\nok\n""\n', "line 3"),
    ("bad.csv", 'prompt,x\nok,1\nok2,1,extra\n', "line 3"),
    ("bad.csv", 'question\nok\n', "line 1"),
    ("bad.txt", b"ok\nfine\n\xff\xfe broken\n", "line 3"),
])
def test_import_prompts_bad_line_inserts_nothing(fresh_store, tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidInput, match=line):
        fresh_store.import_prompts(path)
    assert fresh_store.prompts().empty


def test_import_prompts_bad_parquet_row_and_unknown_type(fresh_store, tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt": ["ok", None, "x"]}).to_parquet(path)
    with pytest.raises(InvalidInput, match="row 2"):
        fresh_store.import_prompts(path)
    (tmp_path / "p.docx").write_text("x")
    with pytest.raises(InvalidInput, match="unsupported"):
        fresh_store.import_prompts(tmp_path / "p.docx")
    assert fresh_store.prompts().empty


# ------------------------------------------------------------------------------------------------ runs
def test_checkpoints_keep_the_newest_two(fresh_store):
    st = fresh_store
    run = st.create_run("ppo", {}, {})
    other = st.create_run("ppo", {}, {})
    st.put_checkpoint(other, 7, b"other")
    for step in (10, 20, 30, 40):
        st.put_checkpoint(run, step, f"state {step}".encode())
    assert st.checkpoints(run).step.tolist() == [30, 40]
    assert st.latest_checkpoint(run) == (40, b"state 40")
    st.put_checkpoint(run, 40, b"rewritten")
    assert st.latest_checkpoint(run) == (40, b"rewritten")
    assert st.latest_checkpoint(other) == (7, b"other")
    assert st.latest_checkpoint(st.create_run("reward", {}, {})) is None


def test_run_lifecycle_and_interrupted_at_startup(tmp_path):
    path = tmp_path / "runs.duckdb"
    with Store(path) as st:
        queued = st.create_run("ppo", {"steps": 10}, {"adapter": None})
        running = st.create_run("reward", {}, {})
        done = st.create_run("ppo", {}, {})
        st.set_run_status(running, "running")
        st.add_run_metrics(running, 0, {"loss": 1.0})
        st.put_checkpoint(running, 0, b"x")  # runs referenced by other tables can still change status
        st.set_run_status(done, "completed")
        assert st.run(queued)["status"] == "queued"
    with Store(path) as st:  # "a new process" starting up
        assert st.mark_running_interrupted() == 2
        assert st.runs().set_index("id").status.to_dict() == {queued: "interrupted", running: "interrupted",
                                                              done: "completed"}
        assert st.mark_running_interrupted() == 0
        st.add_run_samples(running, 0, [{"prompt": "a", "response": "b", "reward": None}])
        st.add_run_samples(running, 0, [{"prompt": "c", "response": "d", "reward": 1.0}])
        assert st.run_samples(running).idx.tolist() == [0, 1]
        assert st.run_metrics(done).columns.tolist() == ["step"]


def test_a_version_2_file_with_runs_migrates_and_runs_take_notes(tmp_path, monkeypatch):
    """Migration 3 alters `runs`, which metrics, checkpoints and adapters reference: a file written by the
    previous version, with such rows, must open, keep them, and take notes."""
    import rlhf_studio.storage.migrations as migrations
    path = tmp_path / "v2.duckdb"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
    with Store(path) as st:
        assert st.schema_version() == 2
        run = st.create_run("ppo", {"steps": 3}, {})
        st.set_run_status(run, "running")
        st.add_run_metrics(run, 1, {"kl": 0.5})
        st.put_checkpoint(run, 1, b"state")
        st.add_adapter(name="a", weights=b"w", config={}, base_model_id="m", run_id=run, step=1)
        assert "notes" not in st.runs().columns
    monkeypatch.undo()
    with Store(path) as st:
        assert st.schema_version() == LATEST_VERSION >= 3
        assert st.run(run)["notes"] is None and st.run(run)["status"] == "running"
        assert st.run_metrics(run)["kl"].tolist() == [0.5] and st.latest_checkpoint(run) == (1, b"state")
        st.add_run_note(run, "trained eagerly: compiling failed")
        st.add_run_note(run, "trained eagerly: compiling failed")     # said again on resume: kept once
        st.add_run_note(run, "another")
        st.add_run_note(run, "trained eagerly")      # a part of an earlier note is a note of its own
        st.add_run_note(run, "another\n")            # a note is one line
        assert st.run(run)["notes"] == "trained eagerly: compiling failed\nanother\ntrained eagerly"
        st.set_run_status(run, "completed")
        assert st.run(run)["notes"].splitlines() == ["trained eagerly: compiling failed", "another", "trained eagerly"]
        with pytest.raises(InvalidInput):
            st.add_run_note(run, "  ")
        with pytest.raises(NotFound):
            st.add_run_note(999, "x")


# ------------------------------------------------------------------------------------------------ withdrawals
def test_a_withdrawn_label_leaves_the_current_labels_and_pairs_and_its_predecessor_returns(fresh_store):
    st = fresh_store
    pid, (c1, c2, c3) = _prompt_with(st, "p", 3)
    s2 = st.add_feedback(kind="stars", completion_id=c1, stars=2, session_id="s")
    s5 = st.add_feedback(kind="stars", completion_id=c1, stars=5, session_id="s")    # replaces 2
    low = st.add_feedback(kind="stars", completion_id=c2, stars=1, session_id="s")
    pw = st.add_feedback(kind="pairwise", completion_id=c2, other_completion_id=c3, winner="a", session_id="t")
    theirs = st.add_feedback(kind="stars", completion_id=c3, stars=4, annotator="other")
    assert _pairs(st) == [(c1, c2, 4.0, "stars"), (c2, c3, 1.0, "pairwise")]

    out = st.retract_feedback(s5, annotator="local", reason="  pressed\n5 by mistake ")
    assert out["label"]["id"] == s5 and out["label"]["stars"] == 5 and out["restored_id"] == s2
    assert st.feedback(kind="stars", annotator="local").set_index("completion_id")["stars"].to_dict() == \
        {c1: 2, c2: 1}
    assert _pairs(st) == [(c1, c2, 1.0, "stars"), (c2, c3, 1.0, "pairwise")]
    hist = st.feedback(history=True).set_index("id")
    assert hist.loc[[s2, s5, low], "superseded"].tolist() == [False, False, False]
    assert hist.loc[[s2, s5, low], "retracted"].tolist() == [False, True, False]
    assert st.retractions()[["feedback_id", "annotator", "reason"]].values.tolist() == \
        [[s5, "local", "pressed 5 by mistake"]]
    assert int(st.prompts().set_index("id").loc[pid, "n_labels"]) == 4

    with pytest.raises(InvalidInput, match="already withdrawn"):
        st.retract_feedback(s5)
    with pytest.raises(NotFound):
        st.retract_feedback(10_000)
    with pytest.raises(InvalidInput, match="only withdraw your own"):
        st.retract_feedback(theirs, annotator="local", own_only=True)
    assert len(st.retractions()) == 1                      # refusals write nothing

    # undo: newest first, per annotator (and session when given); imported labels are never undone
    st.import_preference_pairs([{"prompt": "p", "chosen": "x", "rejected": "y"}], "hh")
    assert st.undo_last_feedback("local", session_id="s")["label"]["id"] == low
    assert st.undo_last_feedback("local")["label"]["id"] == pw
    assert st.undo_last_feedback("local")["label"]["id"] == s2
    with pytest.raises(NotFound, match="Nothing to undo"):
        st.undo_last_feedback("local")
    assert st.feedback(annotator="local").empty and len(st.feedback(annotator="import:hh")) == 1
    assert _pairs(st)[0][2:] == (1.0, "pairwise") and len(_pairs(st)) == 1     # the imported pair only

    # a retried withdrawal (same key) is stored once and answers the same
    k = st.add_feedback(kind="thumbs", completion_id=c1, up=True)
    a = st.retract_feedback(k, idempotency_key="w1")
    b = st.retract_feedback(k, idempotency_key="w1")
    assert a["retraction_id"] == b["retraction_id"] and len(st.retractions()) == 5


def test_a_version_3_file_migrates_to_withdrawals_and_keeps_its_labels(tmp_path, monkeypatch):
    import rlhf_studio.storage.migrations as migrations
    path = tmp_path / "v3.duckdb"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
    with Store(path) as st:
        assert st.schema_version() == 3
        _, (c1, c2) = _prompt_with(st, "p", 2)
        first = st.add_feedback(kind="pairwise", completion_id=c1, other_completion_id=c2, winner="a")
        second = st.add_feedback(kind="pairwise", completion_id=c2, other_completion_id=c1, winner="a")
        assert "retracted" not in st.feedback(history=True).columns
    monkeypatch.undo()
    with Store(path) as st:
        assert st.schema_version() == LATEST_VERSION >= 4
        hist = st.feedback(history=True)
        assert hist["superseded"].tolist() == [True, False] and not hist["retracted"].any()
        assert _pairs(st) == [(c2, c1, 1.0, "pairwise")]
        assert st.undo_last_feedback("local")["restored_id"] == first
        assert _pairs(st) == [(c1, c2, 1.0, "pairwise")]
        backup = st.backup(tmp_path / "copy.duckdb")
    with Store(backup) as st:
        assert st.retractions()["feedback_id"].tolist() == [second]


def test_a_reward_version_kept_without_weights_reads_back(fresh_store):
    """Automatic fast refits may keep their metrics only (migration 2): reading such a version by id gave a
    TypeError instead of the row."""
    st = fresh_store
    with_w = st.add_reward_version("fast", "overall", {}, ["1>2"], 1, {"heldout_accuracy": 0.5}, b"w")
    without = st.add_reward_version("fast", "overall", {}, [], 2, {"heldout_accuracy": 0.6}, None, parent_id=with_w)
    assert st.reward_version(without)["weights"] is None and st.reward_version(with_w)["weights"] == b"w"
    assert st.latest_reward_version("fast")["id"] == with_w
    assert st.latest_reward_version("fast", with_weights=False)["id"] == without


def test_a_ranking_replaces_only_a_ranking_of_the_same_completions(fresh_store):
    """Ranking the completions of a prompt generated again must not replace the ranking of its first ones."""
    st = fresh_store
    _, (a, b, c, d) = _prompt_with(st, "p", 4)
    st.add_feedback(kind="ranking", ranking=[a, b])
    st.add_feedback(kind="ranking", ranking=[c, d])
    assert _pairs(st) == [(a, b, 1.0, "ranking"), (c, d, 1.0, "ranking")]
    st.add_feedback(kind="ranking", ranking=[b, a])              # the same two: a change of mind
    assert _pairs(st) == [(b, a, 1.0, "ranking"), (c, d, 1.0, "ranking")]
    assert st.feedback(history=True)["superseded"].tolist() == [True, False, False]


def test_an_idempotency_key_used_again_for_another_label_is_refused(fresh_store):
    """A retry (same key, same label) is stored once; the same key on a different label raised nothing and
    stored nothing, so that label was lost without a word."""
    st = fresh_store
    _, (a, b) = _prompt_with(st, "p", 2)
    first = st.add_feedback(kind="stars", completion_id=a, stars=5, idempotency_key="k1")
    assert st.add_feedback(kind="stars", completion_id=a, stars=5, idempotency_key="k1") == first
    for other in (dict(kind="stars", completion_id=a, stars=4), dict(kind="stars", completion_id=b, stars=5),
                  dict(kind="stars", completion_id=a, stars=5, annotator="bob"),
                  dict(kind="pairwise", completion_id=a, other_completion_id=b, winner="a")):
        with pytest.raises(InvalidInput, match="already used for another label"):
            st.add_feedback(**other, idempotency_key="k1")
    fb, _ = st.add_rewrite(a, "better", idempotency_key="r1")
    assert st.add_rewrite(a, " better ", idempotency_key="r1")[0] == fb
    with pytest.raises(InvalidInput, match="already used"):
        st.add_rewrite(a, "different", idempotency_key="r1")
    assert len(st.feedback(history=True)) == 2
    with pytest.raises(InvalidInput, match="out of range"):
        st.add_feedback(kind="stars", completion_id=2 ** 70, stars=3)
