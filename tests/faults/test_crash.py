"""Cases 1 and 10, in one child process that loads the model once (tests/faults/label_writer.py):
- out of memory while generating: the error is caught, nothing is written, and the next request works;
- kill -9 while labels are being saved: every acknowledged label survives, no row is half written, and the file
  opens cleanly (as the app opens it: `Store`, with its start-up checks)."""
import os
import signal
import time

import pytest

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
    from storage import Store

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
