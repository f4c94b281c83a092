"""Case 3 (and 2): files that are not what they should be. A file that is not DuckDB, a damaged block inside a
real studio database, a write-ahead log that cannot be replayed, a file locked by another process, a second
handle on the same file. Every case: a clear message, nothing acknowledged lost, the damaged file left as it was."""
import glob
import logging
import os
import random
import shutil
import subprocess
import sys
import threading

import duckdb
import pytest

from rlhf_studio.storage import Store, StorageError
from tests.faults.helpers import ROOT, db_rows

BLOCK = 262144
HEADER = 3 * 4096
N_LABELS = 300


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A real studio database with 300 labels, checkpointed: (path, {feedback id: text})."""
    path = str(tmp_path_factory.mktemp("golden") / "golden.duckdb")
    st = Store(path)
    pid = st.add_prompt("Write a haiku about rain")
    cids = st.add_completions([dict(prompt_id=pid, text=f"completion {i} " + "rain " * 40) for i in range(20)])
    texts = {}
    for i in range(N_LABELS):
        text = f"critique {i}: " + "too long, " * 20
        texts[st.add_feedback(kind="critique", completion_id=cids[i % 20], text=text)] = text
    st._core.con.execute("CHECKPOINT")
    st.close()
    assert not os.path.exists(path + ".wal")
    return path, texts


def _copy(golden, tmp_path, name="db.duckdb") -> str:
    dst = str(tmp_path / name)
    shutil.copy(golden[0], dst)
    return dst


def _blocks_of(path: str, table: str) -> list[int]:
    return [r[0] for r in db_rows(path, f"SELECT DISTINCT block_id FROM pragma_storage_info('{table}') "
                                        "WHERE block_id >= 0 ORDER BY 1")]


def _overwrite(path: str, offset: int, n: int = 4096) -> bytes:
    """Overwrite n bytes with random ones (not a constant pattern: DuckDB's block checksum XORs one hash per 8-byte
    word, so the same change to an even number of identical words, e.g. zero padding, cancels out)."""
    noise = random.Random(offset).randbytes(n)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(noise)
    with open(path, "rb") as fh:
        return fh.read()


# ------------------------------------------------------------------------------------------- not a DuckDB file
@pytest.mark.parametrize("content", [b"this is not a database\n" * 200, b"PK\x03\x04" + os.urandom(5000)],
                         ids=["text", "zip-like"])
def test_not_a_duckdb_file_is_refused_and_left_untouched(tmp_path, content):
    junk = tmp_path / "notes.duckdb"
    junk.write_bytes(content)
    with pytest.raises(StorageError, match="is not a DuckDB database") as e:
        Store(str(junk))
    assert "--db" in str(e.value)
    assert junk.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["notes.duckdb"]       # no .wal, no lock file, nothing new


def test_truncated_database_is_refused_clearly(golden, tmp_path):
    db = _copy(golden, tmp_path)
    data = open(db, "rb").read()
    open(db, "wb").write(data[: len(data) // 2])                 # e.g. a copy that was cut short
    half = open(db, "rb").read()
    with pytest.raises(StorageError) as e:
        Store(db)
    msg = str(e.value)
    assert "damaged" in msg and "backup" in msg and db in msg, msg
    assert open(db, "rb").read() == half


# ------------------------------------------------------------------------------------------- damaged blocks
@pytest.mark.parametrize("where", ["middle-of-file", "feedback-data-block", "index-or-metadata-block"])
def test_damaged_block_is_found_at_start_up(golden, tmp_path, where):
    db = _copy(golden, tmp_path)
    size = os.path.getsize(db)
    data_blocks = set()
    for t in ("prompts", "completions", "feedback", "criteria", "schema_version"):
        data_blocks |= set(_blocks_of(db, t))
    n_blocks = (size - HEADER) // BLOCK
    if where == "middle-of-file":
        offset = size // 2
    elif where == "feedback-data-block":
        offset = HEADER + _blocks_of(db, "feedback")[-1] * BLOCK + BLOCK // 2
    else:
        other = [b for b in range(n_blocks) if b not in data_blocks]
        assert other, "expected index or metadata blocks"
        offset = HEADER + other[-1] * BLOCK + BLOCK // 2
    damaged = _overwrite(db, offset)
    with pytest.raises(StorageError) as e:
        Store(db)
    msg = str(e.value)
    assert "is damaged" in msg and "backup" in msg and db in msg, msg
    assert open(db, "rb").read() == damaged                      # the damaged file is kept as it was
    assert not os.path.exists(db + ".wal")
    # the same file without the damage opens and has every label
    good = _copy(golden, tmp_path, "good.duckdb")
    with Store(good) as st:
        assert st._core.warnings == []
        assert len(st.feedback(history=True)) == N_LABELS


def test_damaged_free_space_only_warns(tmp_path, caplog):
    """A damaged block that no table uses (free space left by a dropped table) must not lock the user out."""
    db = str(tmp_path / "free.duckdb")
    con = duckdb.connect(db)
    con.execute("CREATE TABLE junk AS SELECT i, repeat('j', 200) AS s FROM range(60000) t(i)")
    con.execute("CREATE TABLE keep AS SELECT i FROM range(10) t(i)")
    con.execute("CHECKPOINT")
    junk = [r[0] for r in con.execute("SELECT DISTINCT block_id FROM pragma_storage_info('junk') "
                                      "WHERE block_id >= 0").fetchall()]
    con.execute("DROP TABLE junk")
    con.execute("CHECKPOINT")
    free = con.execute("SELECT free_blocks FROM pragma_database_size()").fetchall()[0][0]
    con.close()
    assert free > 0
    size = os.path.getsize(db)
    target = [b for b in junk if HEADER + (b + 1) * BLOCK <= size][0]
    _overwrite(db, HEADER + target * BLOCK + 5000)
    with caplog.at_level(logging.WARNING, logger="rlhf_studio.storage"):
        st = Store(db)
    try:
        assert len(st._core.warnings) == 1 and "fail their checksum" in st._core.warnings[0]
        assert any("fail their checksum" in r.getMessage() for r in caplog.records)
        pid = st.add_prompt("still usable")
        assert st.prompts()["id"].tolist() == [pid]
    finally:
        st.close()


# ------------------------------------------------------------------------------------------- write-ahead log
def _labels_in_wal(golden, tmp_path, child_factory, n=40):
    """Copy the golden file, let a child process add n labels and die by SIGKILL (labels only in the WAL)."""
    db = _copy(golden, tmp_path)
    child = child_factory("store_writer.py", db, str(n), "selfkill")
    child.expect("READY")
    acked = [int(child.expect("ACK").split()[1]) for _ in range(n)]
    child.expect("DONE")
    child.proc.wait(timeout=30)
    assert os.path.getsize(db + ".wal") > 0
    return db, acked


def test_clean_wal_after_kill_is_replayed_silently(golden, tmp_path, child_factory):
    db, acked = _labels_in_wal(golden, tmp_path, child_factory)
    with Store(db) as st:
        assert st._core.warnings == []
        ids = set(st.feedback(history=True)["id"])
    assert set(acked) <= ids and len(ids) == N_LABELS + len(acked)
    assert glob.glob(db + ".wal.quarantined-*") == []


def test_garbage_wal_is_quarantined_not_deleted(golden, tmp_path, caplog):
    db = _copy(golden, tmp_path)
    garbage = b"not a write-ahead log\n" * 50 + os.urandom(3000)
    open(db + ".wal", "wb").write(garbage)
    with caplog.at_level(logging.WARNING, logger="rlhf_studio.storage"):
        st = Store(db)
    try:
        q = glob.glob(db + ".wal.quarantined-*")
        assert len(q) == 1 and open(q[0], "rb").read() == garbage
        stamp = q[0].rsplit("-", 1)[1]
        assert stamp.endswith("Z") and stamp[:8].isdigit()                    # a UTC time stamp
        assert len(st._core.warnings) == 1 and q[0] in st._core.warnings[0]
        assert any(q[0] in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert len(st.feedback(history=True)) == N_LABELS                    # the database itself is intact
        st.add_prompt("new prompt after the quarantine")
    finally:
        st.close()
    with Store(db) as st:                                                    # next start: quiet again
        assert st._core.warnings == [] and "new prompt after the quarantine" in st.prompts()["text"].tolist()


@pytest.mark.parametrize("damage", ["flipped-byte", "torn-tail"])
def test_damaged_wal_keeps_what_was_saved_before_the_damage(golden, tmp_path, child_factory, damage):
    db, acked = _labels_in_wal(golden, tmp_path, child_factory)
    wal = open(db + ".wal", "rb").read()
    if damage == "flipped-byte":
        pos = len(wal) // 2
        wal = wal[:pos] + bytes([wal[pos] ^ 0xFF]) + wal[pos + 1:]
    else:
        wal = wal[:-37]                       # as if the machine stopped while the last save was written
    open(db + ".wal", "wb").write(wal)
    st = Store(db)
    try:
        q = glob.glob(db + ".wal.quarantined-*")
        assert len(q) == 1 and open(q[0], "rb").read() == wal                # kept byte for byte
        assert len(st._core.warnings) == 1 and "replayed" in st._core.warnings[0]
        ids = sorted(set(st.feedback(history=True)["id"]) - set(golden[1]))
        # the labels before the damage are there, in order; those after it are only in the quarantined file
        assert ids == acked[: len(ids)]
        if damage == "flipped-byte":
            assert 0 < len(ids) < len(acked)
        else:
            assert len(ids) == len(acked) - 1
        fid = st.add_feedback(kind="critique", completion_id=1, text="after the quarantine")
        assert fid > max(acked)                                              # ids are never reused
    finally:
        st.close()


# ------------------------------------------------------------------------------------------- same file twice
def test_second_store_in_the_same_process_shares_the_file(tmp_path):
    """A notebook cell re-run opens the file again while the first handle is still busy writing."""
    db = str(tmp_path / "twice.duckdb")
    a = Store(db)
    pid = a.add_prompt("p")
    cid = a.add_completion(prompt_id=pid, text="c")
    acked, errors = [], []

    def writer(st, n):
        try:
            for i in range(n):
                acked.append(st.add_feedback(kind="stars", completion_id=cid, stars=1 + i % 5))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    b = Store(db)
    ts = [threading.Thread(target=writer, args=(s, 40)) for s in (a, b)]
    for t in ts:
        t.start()
    a.close()                           # closing one handle mid-stream must not stop the other
    for t in ts:
        t.join()
    # a's writes after its close are refused with a clear message; none is lost silently
    for e in errors:
        assert isinstance(e, StorageError) and "closed" in str(e)
    b.add_feedback(kind="stars", completion_id=cid, stars=5)
    b.close()
    ids = {r[0] for r in db_rows(db, "SELECT id FROM feedback")}
    assert set(acked) <= ids and len(ids) == len(acked) + 1


def test_app_refuses_a_locked_or_damaged_file_with_exit_code_2(golden, tmp_path):
    """What the user sees: `python launch.py --db FILE` exits 2 with a message naming the file and what to do."""
    locked = _copy(golden, tmp_path, "locked.duckdb")
    damaged = _copy(golden, tmp_path, "damaged.duckdb")
    _overwrite(damaged, HEADER + _blocks_of(damaged, "feedback")[-1] * BLOCK + 1000)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({locked!r}); "
                               "print('ok', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    runs = []
    try:
        assert holder.stdout.readline().strip() == "ok"
        runs = [subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--db", db, "--no-browser"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                for db in (locked, damaged)]          # both at once: each spends its time importing torch
        (_, err_locked), (_, err_damaged) = (p.communicate(timeout=300) for p in runs)
    finally:
        for p in [holder, *runs]:                     # an app that started anyway must not outlive the test
            if p.poll() is None:
                p.kill()
            p.wait()
    assert runs[0].returncode == 2, err_locked[-2000:]
    assert locked in err_locked and "locked" in err_locked and f"PID {holder.pid}" in err_locked
    assert "--db" in err_locked and "Traceback" not in err_locked
    assert runs[1].returncode == 2, err_damaged[-2000:]
    assert damaged in err_damaged and "is damaged" in err_damaged and "backup" in err_damaged
    assert "Traceback" not in err_damaged
