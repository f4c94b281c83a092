"""Child process of the disk-full case: a real file-size limit (RLIMIT_FSIZE) makes every write past it fail with
EFBIG, as a full disk makes it fail with ENOSPC. Labels through `storage.Store` until a save fails, then the limit
is lifted ("space freed"), more labels, then SIGKILL without closing.

    READY / ACK <id> / FAIL <message> / FREED / ACK <id> ... / KILLING
"""
import os
import resource
import signal
import sys

from rlhf_studio.storage import Store, StorageError


def main() -> None:
    db = sys.argv[1]
    st = Store(db)
    st._core.con.execute("SET checkpoint_threshold = '1GB'")
    pid = st.add_prompt("Name a fruit")
    cid = st.add_completion(prompt_id=pid, text="apple")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of being killed by SIGXFSZ
    limit = max(os.path.getsize(db), os.path.getsize(db + ".wal")) + 64 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    print("READY", flush=True)
    for i in range(100_000):
        try:
            fid = st.add_feedback(kind="critique", completion_id=cid, text=f"label {i} " + "x" * 500)
        except StorageError as e:
            print("FAIL", " ".join(str(e).split()), flush=True)
            break
        print("ACK", fid, flush=True)
    for _ in range(3):   # still full: every try fails the same way, nothing half-saved
        try:
            st.add_feedback(kind="critique", completion_id=cid, text="still full " + "y" * 500)
            print("UNEXPECTED success while full", flush=True)
        except StorageError:
            pass
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("FREED", flush=True)
    for i in range(5):
        print("ACK", st.add_feedback(kind="critique", completion_id=cid, text=f"after {i}"), flush=True)
    print("KILLING", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
