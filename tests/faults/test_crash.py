"""Cases 1 and 10, in one child process that loads the model once (tests/faults/label_writer.py):
- out of memory while generating: the error is caught, nothing is written, and the next request works;
- kill -9 while labels are being saved: every acknowledged label survives, no row is half written, and the file
  opens cleanly (as the app opens it: `Store`, with its start-up checks)."""
import os
import signal
import time

import pytest

from rlhf_studio import StudioError
from tests.faults.helpers import Child


pytestmark = pytest.mark.slow

KILL_AFTER_ACKS = 30


def _rows(st, sql):
    """Plain Python values through the open store's own read cursor."""
    return st._core.cursor().execute(sql).fetchall()


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    """The child, started once: its out-of-memory report and READY line are read here."""
    db = str(tmp_path_factory.mktemp("crash") / "crash.duckdb")
    t_start = time.time()
    child = Child("label_writer.py", db)
    try:
        oom = child.expect("OOM")
        counts = [int(x) for x in child.expect("COUNTS").split()[1:]]
        ready = child.expect("READY").split()
        print(f"child ready in {time.time() - t_start:.1f} s")
        yield dict(db=db, child=child, oom=oom, counts=counts, model_ids=[int(x) for x in ready[1:]])
    finally:
        child.close()


def test_out_of_memory_while_generating_leaves_the_studio_usable(writer):
    oom = writer["oom"]
    assert oom != "OOM none", "the capped generation did not run out of memory"
    assert "memory" in oom.lower(), oom
    assert writer["counts"] == [0, 0, 0], "the failed generation wrote rows"
    assert len(writer["model_ids"]) == 4        # the next generation worked (and labels follow, see below)


def test_out_of_memory_while_generating_gives_advice(writer):
    _, kind, message = writer["oom"].split(" ", 2)
    assert kind == "StudioError", writer["oom"]
    assert "out of memory" in message and ("fewer" in message or "lower" in message), message


def test_kill_9_during_a_stream_of_labels(writer):
    from rlhf_studio.storage import Store

    db, child, model_ids = writer["db"], writer["child"], writer["model_ids"]
    acked: list[tuple[str, int, int | None]] = []
    t0 = time.time()
    while len(acked) < KILL_AFTER_ACKS:
        parts = child.readline().split()
        if parts[0] == "ACK":
            acked.append((parts[1], int(parts[2]), int(parts[3]) if len(parts) > 3 else None))
    os.kill(child.proc.pid, signal.SIGKILL)     # mid-stream: the next label is being saved right now
    child.proc.wait(timeout=30)
    assert child.proc.returncode == -signal.SIGKILL
    print(f"{len(acked)} labels acknowledged in {time.time() - t0:.1f} s before SIGKILL")

    st = Store(db)                               # opens cleanly: WAL replayed, every block checksum verified
    try:
        # a WAL cut in the middle of an entry is quarantined (never deleted) with a warning; nothing else is
        for w in st._core.warnings:
            assert "is incomplete" in w, w
        fb = st.feedback(history=True).set_index("id")
        missing = [a for a in acked if a[1] not in fb.index]
        assert not missing, f"acknowledged labels lost: {missing}"
        for kind, fid, new_cid in acked:
            assert fb.loc[fid, "kind"] == kind
        # no half-written row: every field a label must have is set, every reference resolves
        rows = _rows(st, """
            SELECT id, kind, criterion, prompt_id, completion_id, other_completion_id, stars, up, winner, ranking,
                   text, rewrite_completion_id, annotator, session_id, source, created_at FROM feedback""")
        assert len(rows) >= len(acked)
        comp = {r[0]: r[1] for r in _rows(st, "SELECT id, prompt_id FROM completions")}
        for (fid, kind, crit, pid, cid, other, stars, up, winner, ranking, text, rw, annot, sess, src, ts) in rows:
            assert crit == "overall" and annot == "local" and src == "human" and sess and ts is not None, fid
            assert pid == comp[model_ids[0]], fid
            if kind == "stars":
                assert cid in comp and 1 <= stars <= 5
            elif kind == "thumbs":
                assert cid in comp and up is False
            elif kind == "pairwise":
                assert {cid, other} == set(model_ids[:2]) and winner in ("a", "b")
            elif kind == "ranking":
                assert sorted(ranking) == sorted(model_ids)
            elif kind == "critique":
                assert cid == model_ids[2] and text.startswith("critique ")
            elif kind == "rewrite":
                assert cid == model_ids[2] and rw in comp, f"rewrite {fid} lost its human completion"
        for kind, fid, new_cid in acked:
            if kind == "rewrite":
                assert fb.loc[fid, "rewrite_completion_id"] == new_cid
        human = _rows(st, "SELECT id, text, corrects_id FROM completions WHERE source = 'human'")
        assert all(t.startswith("rewrite ") and c == model_ids[2] for _, t, c in human)
        # the idempotency keys of the acknowledged star labels are unique and present
        keys = [r[0] for r in _rows(st, "SELECT idempotency_key FROM feedback WHERE idempotency_key IS NOT NULL")]
        assert len(keys) == len(set(keys))
        # and the file takes new labels
        n = len(fb)
        st.add_feedback(kind="stars", completion_id=model_ids[0], stars=3)
        assert len(st.feedback(history=True)) == n + 1
    finally:
        st.close()


def test_kill_9_during_reward_model_training(tmp_path, child_factory, lm):
    """The run is marked interrupted at the next start, only complete versions exist, and the next update
    warm-starts from the newest complete one and still trains on the pairs the lost update had."""
    from rlhf_studio import Studio
    db = str(tmp_path / "deep.duckdb")
    child = child_factory("deep_writer.py", db)
    v1 = int(child.expect("V1").split()[1])
    _, run_id, n_feedback = child.expect("TRAINING").split()
    time.sleep(2)                                    # well inside the long update
    child.kill()
    s = Studio(db, model=lm)
    try:
        s.reward.settings.deep_every = 0
        run = s.store.run(int(run_id))
        assert run["kind"] == "reward" and run["status"] == "interrupted", run
        assert run["lineage"]["parent_version"] == v1
        deep = s.reward_versions().query("tier == 'deep'")
        assert deep["id"].tolist() == [v1]            # nothing half-written from the killed update
        assert s.store.stats()["feedback"] == int(n_feedback)
        with pytest.raises(StudioError, match="not a PPO run"):
            s.resume_ppo(int(run_id))
        v2 = s.train_reward_model(tier="deep", lora_layers=1, epochs=1, batch_size=4, micro_batch_size=2,
                                  max_tokens=64)
        row = s.store.reward_version(v2)
        assert row["parent_id"] == v1
        assert row["metrics"]["new_pairs"] == run["lineage"]["new_pairs"] > 0
        runs = s.runs()
        assert runs.set_index("id").loc[int(run_id), "status"] == "interrupted"
        assert (runs[runs["kind"] == "reward"]["status"] == "completed").sum() == 2
    finally:
        s.close()
