"""Case 6: the disk fills up while labels are saved. The error is clear, everything saved before is intact, and
after space is freed the next save works, also across a crash."""
import os
import subprocess

import pytest

from rlhf_studio.storage import StorageError, Store


def test_full_tmpfs(tmp_path):
    """A real full file system: a 3 MB tmpfs (needs root and a sandbox that allows mount; skipped otherwise,
    the RLIMIT_FSIZE case below runs everywhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); see the RLIMIT_FSIZE case")
    try:
        db = str(mnt / "full.duckdb")
        st = Store(db)
        pid = st.add_prompt("Name a fruit")
        cid = st.add_completion(prompt_id=pid, text="apple")
        acked = [st.add_feedback(kind="critique", completion_id=cid, text=f"before {i}") for i in range(20)]
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        with open(mnt / "filler", "wb") as fh:                    # leave about 24 KB
            fh.write(b"\0" * max(0, free - 24 * 1024))
        err = None
        for i in range(10_000):
            try:
                acked.append(st.add_feedback(kind="critique", completion_id=cid, text=f"filling {i} " + "z" * 900))
            except StorageError as e:
                err = str(e)
                break
        assert err is not None, "the disk never filled up"
        assert "disk is full" in err and "Free some disk space" in err and "intact" in err, err
        for _ in range(3):
            with pytest.raises(StorageError, match="disk is full"):
                st.add_feedback(kind="critique", completion_id=cid, text="still full " + "z" * 900)
        ids = set(st.feedback(history=True)["id"])
        assert set(acked) == ids                                  # old data intact, nothing half-saved
        st.close()                                                # closing while full must not lose anything
        with Store(db) as st2:                                    # reopen still full
            assert set(st2.feedback(history=True)["id"]) == set(acked)
        os.remove(mnt / "filler")                                 # free the space
        with Store(db) as st3:
            fid = st3.add_feedback(kind="critique", completion_id=cid, text="after freeing space")
            assert set(st3.feedback(history=True)["id"]) == set(acked) | {fid}
            assert st3._core.warnings == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_file_size_limit_then_crash(tmp_path, child_factory):
    db = str(tmp_path / "fsize.duckdb")
    child = child_factory("fsize_writer.py", db)
    child.expect("READY")
    acked, fail = [], None
    while True:
        line = child.readline()
        if line.startswith("ACK"):
            acked.append(int(line.split()[1]))
        elif line.startswith("FAIL"):
            fail = line
        elif line.startswith("UNEXPECTED"):
            pytest.fail(line)
        elif line == "KILLING":
            break
    child.proc.wait(timeout=30)
    assert fail and "disk is full" in fail and "File too large" in fail, fail
    assert len(acked) > 5
    with Store(db) as st:
        assert set(acked) <= set(st.feedback(history=True)["id"])  # before the failure and after it
        for w in st._core.warnings:
            assert "is incomplete" in w, w
        texts = st.feedback(history=True)["text"].tolist()
        assert not any(t.startswith("still full") for t in texts)
