"""Cases 4 and 5: DuckDB rolling a write back without raising at COMMIT, real write conflicts from a second
connection in the same process, and a double submit of the same label."""
import threading

import duckdb
import pytest

from rlhf_studio.storage import StorageError, Store
from rlhf_studio import StudioError


@pytest.fixture
def store(tmp_path):
    st = Store(str(tmp_path / "conflicts.duckdb"))
    pid = st.add_prompt("p")
    st.cids = st.add_completions([dict(prompt_id=pid, text="a"), dict(prompt_id=pid, text="b")])
    yield st
    st.close()


def _insert_label_then_swallow_an_error(cids):
    """A write that inserts a label, then runs a statement that fails and swallows the error (as an 'insert or
    ignore' written with try/except would). DuckDB marks the transaction aborted; COMMIT then returns normally
    and rolls everything back."""
    def fn(cur):
        fid = cur.execute("INSERT INTO feedback (id, kind, prompt_id, completion_id, stars) VALUES "
                          "(nextval('feedback_id_seq'), 'stars', 1, ?, 4) RETURNING id", [cids[0]]).fetchall()[0][0]
        try:
            cur.execute("INSERT INTO criteria (name) VALUES ('overall')")      # duplicate primary key
        except duckdb.ConstraintException:
            pass
        return fid
    return fn


def test_commit_that_silently_rolls_back_is_caught_by_the_read_back(store):
    # 1. DuckDB itself: COMMIT of an aborted transaction does not raise, and nothing is saved.
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(duckdb.ConstraintException):
        con.execute("INSERT INTO t VALUES (1)")
    con.execute("COMMIT")                                                   # no exception...
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(0,)]     # ...and the row is gone
    con.close()

    # 2. The same through the store's writer: without the read-back the id would be acknowledged and lost.
    before = len(store.feedback(history=True))
    fn = _insert_label_then_swallow_an_error(store.cids)
    lost_id = store._core.write(fn, "the stars label", check=None)
    assert isinstance(lost_id, int) and lost_id not in set(store.feedback(history=True)["id"])

    # 3. With the check every Store write uses (read the row back after COMMIT): StorageError, no id.
    def check(cur, fid):
        return cur.execute("SELECT count(*) FROM feedback WHERE id = ?", [fid]).fetchall()[0][0] == 1
    with pytest.raises(StorageError, match="was not saved .*rolled the write back.* try again"):
        store._core.write(fn, "the stars label", check=check)
    assert len(store.feedback(history=True)) == before
    # the writer is healthy afterwards
    fid = store.add_feedback(kind="stars", completion_id=store.cids[0], stars=2)
    assert fid in set(store.feedback(history=True)["id"])


def test_update_conflict_with_a_second_connection_in_the_same_process(store):
    """`duckdb.connect(path)` in the same process (a notebook poking at the file) shares the database instance:
    its open transaction makes the store's UPDATE of the same row conflict."""
    rid = store.create_run("ppo")
    other = duckdb.connect(store.path)                  # same instance (DuckDB's instance cache)
    try:
        other.execute("BEGIN")
        other.execute("UPDATE runs SET error = 'notebook' WHERE id = ?", [rid])
        with pytest.raises(StorageError, match="was not saved.*(Conflict|conflict).*try again"):
            store.set_run_status(rid, "running")
        assert store.run(rid)["status"] == "queued"     # nothing half-applied
        other.execute("ROLLBACK")
        store.set_run_status(rid, "running")            # the retry works
        assert store.run(rid)["status"] == "running"
    finally:
        other.close()


def test_same_idempotency_key_from_a_concurrent_transaction(store):
    """Another connection inserts a label with key 'k' and has not committed yet; the store, which cannot see
    that row, inserts its own: DuckDB refuses one of them, and the store never returns an id it did not save."""
    other = duckdb.connect(store.path)
    try:
        other.execute("BEGIN")
        other.execute("INSERT INTO feedback (id, kind, prompt_id, completion_id, stars, idempotency_key) VALUES "
                      "(nextval('feedback_id_seq'), 'stars', 1, ?, 1, 'k')", [store.cids[1]])
        try:
            fid = store.add_feedback(kind="stars", completion_id=store.cids[1], stars=5, idempotency_key="k")
        except StorageError as e:
            fid = None
            assert "not saved" in str(e) or "rejected" in str(e), e
        try:
            other.execute("COMMIT")
        except duckdb.Error:
            pass
    finally:
        other.close()
    rows = store._core.cursor().execute("SELECT id, stars FROM feedback WHERE idempotency_key = 'k'").fetchall()
    assert len(rows) == 1                                # one label for the key, never two
    if fid is not None:                                  # if the store acknowledged, its row is the one kept
        assert rows[0] == (fid, 5)


def test_double_submit_with_one_idempotency_key_gives_one_row(studio):
    cs = studio.generate("Pick a colour", n=2, max_new_tokens=4, seed=0)
    for round_ in range(25):
        key = f"click-{round_}"
        start = threading.Barrier(2)
        ids, errors = [], []

        def submit():
            start.wait()
            try:
                ids.append(studio.rate(cs[0].id, 1 + round_ % 5, idempotency_key=key))
            except StudioError as e:
                errors.append(e)

        ts = [threading.Thread(target=submit) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors and len(ids) == 2 and ids[0] == ids[1], (ids, errors)
    fb = studio.feedback(history=True)
    assert len(fb) == 25 and fb["idempotency_key"].is_unique
