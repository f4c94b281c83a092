"""The training job's channel: nobody else can join or feed it, and a message of the wrong kind, shape or size
fails the run cleanly while the app keeps serving (studio/channel.py, studio/jobs.py)."""
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from rlhf_studio.studio import channel as ch
from rlhf_studio.studio.jobs import APP_TO_JOB, JOB_TO_APP
from tests.browser import ROOT

TINY = dict(batch_size=2, mini_batch_size=2, max_new_tokens=4, ppo_epochs=1, checkpoint_every=0)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    job, app = ch.Channel(a, APP_TO_JOB), ch.Channel(b, JOB_TO_APP)
    yield job, app
    job.close()
    app.close()


def test_messages_round_trip_as_data(pair):
    job, app = pair
    blob = bytes(range(256)) * 3
    job.send(("metrics", {"step": 1, "kl": float("nan")}, [{"prompt": "p", "response": "<b>r</b>", "reward": 0.5}]))
    job.send(("checkpoint", 2, blob))
    job.send(("error", "ValueError: x"))                   # the optional traceback left out
    assert app.poll(5)
    assert app.recv() == ("metrics", {"step": 1, "kl": pytest.approx(float("nan"), nan_ok=True)},
                          [{"prompt": "p", "response": "<b>r</b>", "reward": 0.5}])
    assert app.recv() == ("checkpoint", 2, blob)
    assert app.recv() == ("error", "ValueError: x")
    app.send(("spec", {"weights": blob, "prompts": ["a", "b"], "checkpoint": None}))
    assert job.recv() == ("spec", {"weights": blob, "prompts": ["a", "b"], "checkpoint": None})


def _raw(header: bytes, n_blobs: int = 0) -> bytes:
    return b"RLC1" + struct.pack(">IQ", len(header), n_blobs) + header


@pytest.mark.parametrize("frame, says", [
    (("metrics", {"step": "1"}, []), "item 1"),
    (("metrics", {"step": 1}, [{"prompt": "p"}]), "item 2"),
    (("checkpoint", True, b"x"), "item 1"),
    (("done", "hacked"), "item 1"),
    (("exec", "import os"), "unexpected message kind 'exec'"),
    (("note",), "has 0 items"),
    (b"RLC1" + struct.pack(">IQ", 2, 64 * 2**30) + b"{}", "too large"),
    (b"RLC1" + struct.pack(">IQ", 200 * 2**20, 0), "too large"),
    (b"\x80\x04\x95" + b"\x00" * 13, "bad magic"),        # a pickle's first bytes
    (_raw(b"{nope"), "not JSON"),
    (_raw(b'{"m":["adapter",{"\\u0000blob":0},1]}'), "does not describe its blobs"),
    (_raw(b'{"m":["adapter",{"\\u0000blob":0},1],"n":[]}'), "a blob it does not carry"),
])
def test_a_malformed_message_is_refused_before_it_is_used(pair, frame, says):
    job, app = pair
    if isinstance(frame, tuple):
        job.expect = {**JOB_TO_APP}                          # a sender does not check what it sends
        job.send(frame)
    else:
        job.sock.sendall(frame)
    with pytest.raises(ch.ChannelError, match=says):
        app.recv()


def test_the_sender_refuses_what_is_not_data(pair):
    job, _ = pair
    with pytest.raises(TypeError, match="cannot be sent"):
        job.send(("metrics", {"step": object()}, []))


@pytest.fixture(scope="module")
def reward_db(tmp_path_factory, lm):
    """A closed DuckDB file with prompts and a fast-tier reward model (made once for this file's runs)."""
    from tests.studios import open_studio
    path = str(tmp_path_factory.mktemp("channel") / "reward.duckdb")
    with open_studio(path, lm) as s:
        for p in ["Name a fruit.", "Say hello."]:
            cs = s.generate(p, n=3, max_new_tokens=4, seed=0)
            s.rank([c.id for c in cs])
        assert s.train_reward_model(tier="fast") is not None
    return path


@pytest.fixture
def with_reward(reward_db, tmp_path, lm):
    import shutil
    from tests.studios import open_studio
    db = str(tmp_path / "studio.duckdb")
    shutil.copy(reward_db, db)
    with open_studio(db, lm) as s:
        yield s


@pytest.mark.slow
def test_a_job_that_sends_garbage_fails_its_run_and_the_app_keeps_serving(with_reward, monkeypatch, tmp_path):
    """A real job process that sends a message of the wrong shape, then one that sends a pickle (what the old
    channel unpickled): each run fails at once with a clear message, and the app goes on serving."""
    s = with_reward
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("HOSTILE_JOB_MARKER", str(marker))
    s.jobs.worker_module = "tests.hostile_job"
    for sends in ("wrong_shape", "pickle"):
        monkeypatch.setenv("HOSTILE_JOB_SENDS", sends)
        t0 = time.time()
        run = s.train_ppo(steps=1, wait=True, **TINY)
        assert time.time() - t0 < 60                       # stopped at once, not after the job's 120 s
        row = s.store.run(run.run_id)
        assert row["status"] == "failed"
        assert "sent a message the studio does not accept" in row["error"], row["error"]
        assert run._process.poll() is not None and not marker.exists()
        assert len(s.store.run_metrics(run.run_id)) == 0   # nothing of it was written
        # the app keeps serving: labels are stored and another job may start
        cs = s.completions()
        assert s.compare(int(cs["id"].iloc[0]), int(cs["id"].iloc[1]), "a") > 0
        assert not s.jobs.busy()


@pytest.mark.slow
def test_a_local_user_reading_the_process_table_cannot_join_or_feed_the_channel(with_reward, tmp_path,
                                                                               monkeypatch):
    """Another local process watches for the job, reads its command line and environment, and tries to join
    with what it finds (as it could when the address and key were on the command line) and to connect to any
    port the app or the job listens on. It learns nothing, gets nothing in, and the run completes. The job is
    the stand-in's one-step run: the channel is the real one, the minute of a real PPO step is spared."""
    s = with_reward
    monkeypatch.setenv("HOSTILE_JOB_SENDS", "one_step")
    s.jobs.worker_module = "tests.hostile_job"
    stop, marker, report = tmp_path / "stop", tmp_path / "code-ran", tmp_path / "report.json"
    attacker = subprocess.Popen([sys.executable, "-m", "tests.process_table_attacker", str(stop), str(marker),
                                 str(report)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        run = s.train_ppo(steps=1, wait=True, **TINY)
    finally:
        stop.touch()
        attacker.wait(timeout=60)
    seen = json.loads(report.read_text())
    assert seen["job_seen"], "the attacker never saw the job's process"
    assert not marker.exists(), seen                          # no code of the attacker's ran in the app
    assert not any("sent" in a for a in seen["attempts"]), seen
    assert seen["secrets"] == [] and seen["addresses"] == [], seen
    argv = seen["argv"]
    assert argv[1] == "-m" and argv[3] == "--channel-fd" and argv[4].isdigit() and len(argv) == 5, seen
    assert seen["env_added"] in ([], ["PYTHONPATH"]), seen     # no secret in the environment either
    assert run.status == "completed", s.store.run(run.run_id)["error"]
    assert len(s.store.run_metrics(run.run_id)) == 1
