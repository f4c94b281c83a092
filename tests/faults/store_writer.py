"""Child process: labels through `storage.Store` (the write path under `Studio.rate`), one line per acknowledged
label, then either waits for the parent's SIGKILL or kills itself without closing (no checkpoint: the labels stay
in the write-ahead log).

    python store_writer.py DB N [selfkill|wait] [text_bytes]
    READY <completion ids...>
    ACK <feedback id>
    DONE
"""
import os
import signal
import sys
import time

from rlhf_studio.storage import Store


def main() -> None:
    db, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    text_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    st = Store(db)
    st._core.con.execute("SET checkpoint_threshold = '1GB'")   # keep every label in the WAL until the kill
    pid = st.add_prompt("Name a fruit")
    cids = st.add_completions([dict(prompt_id=pid, text=f"fruit {i}") for i in range(4)])
    print("READY", *cids, flush=True)
    for i in range(n):
        fid = st.add_feedback(kind="critique", completion_id=cids[i % 4], text=f"label {i} " + "x" * text_bytes)
        print("ACK", fid, flush=True)
    print("DONE", flush=True)
    if mode == "selfkill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
