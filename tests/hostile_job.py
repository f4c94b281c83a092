"""A stand-in for a training job (`JobManager.worker_module = "tests.hostile_job"`): it takes the spec like the
real job, then sends what HOSTILE_JOB_SENDS names: garbage (and waits to be stopped), or, for "one_step", the
messages of a one-step run after a second's pause (a window for whoever tries to join the channel)."""
import os
import pickle
import struct
import sys
import time

from rlhf_studio.studio import channel as ch
from rlhf_studio.studio.jobs import APP_TO_JOB


class _Boom:
    def __reduce__(self):           # unpickling this would run code in the app
        return (os.system, ("touch " + os.environ.get("HOSTILE_JOB_MARKER", "/nonexistent/x"),))


def main() -> None:
    conn = ch.inherited(sys.argv[1:], APP_TO_JOB)
    assert conn.recv()[0] == "spec"
    conn.send(("started", 0))
    what = os.environ["HOSTILE_JOB_SENDS"]
    if what == "one_step":
        time.sleep(1.0)
        conn.send(("metrics", {"step": 1, "reward_mean": 0.5}, [{"prompt": "p", "response": "r", "reward": 0.5}]))
        conn.send(("done", "completed"))
        return
    if what == "wrong_shape":        # a metrics dict whose values are not numbers
        conn.send(("metrics", {"step": "1; DROP TABLE runs"}, []))
    elif what == "unknown_kind":
        conn.send(("exec", "import os"))
    elif what == "oversized":        # announces 64 GiB of blobs: refused before anything is read
        conn.sock.sendall(struct.pack(">4sIQ", ch.MAGIC, 2, 64 * 2**30) + b"{}")
    elif what == "pickle":           # what the old channel unpickled
        conn.sock.sendall(pickle.dumps(("metrics", _Boom(), [])))
    time.sleep(120)                  # the app stops it; it must not wait for us


if __name__ == "__main__":
    main()
