"""Load (issue 6): the real app (`python launch.py`, embedded SmolLM2-135M) on a DuckDB file, four browser
sessions labelling for a minute while the deep reward tier trains: no lost labels, no errors, p99 label latency
reported (artifacts/load_test.json; never asserted: timings depend on the machine). And a full queue: requests
beyond --max-queue are answered at once with a clear "busy, try again", and the app serves normally afterwards.
"""
import http.client
import json
import shutil
import threading
import time
import urllib.parse
import uuid

import pytest

from tests.browser import ARTIFACTS, browser, open_app, running_app
from tests.faults.helpers import db_rows
from tests.faults.load_sessions import (check_db, run_label_load, seed_database, stop_gracefully,
                                        summary, write_json)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SESSIONS = 4
SECONDS = 60


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, lm):
    """A database with 16 prompts x 4 completions and 64 star ratings (96 preference pairs); copied per test."""
    path = str(tmp_path_factory.mktemp("load") / "seed.duckdb")
    info = seed_database(path, lm, n_prompts=16)
    return path, info


def _copy(seed_path: str, dest: str) -> str:
    shutil.copy(seed_path, dest)
    return dest


def _app_log(db: str) -> str:
    from pathlib import Path
    return Path(db).with_suffix(".log").read_text(errors="replace")


# ------------------------------------------------------------------------------ 4 sessions for a minute
def test_four_sessions_label_for_a_minute_while_the_deep_tier_trains(seeded, tmp_path):
    seed_path, info = seeded
    db = _copy(seed_path, str(tmp_path / "load.duckdb"))
    prompts = info["prompts"]
    with running_app(db) as (url, proc):
        result = run_label_load(url, prompts, n_sessions=SESSIONS, seconds=SECONDS, train=True)
        signalled = time.strftime("%H:%M:%S")
        rc = stop_gracefully(proc)
    log = _app_log(db)
    phase = result["phases"][0]
    sessions, samples = phase["sessions"], phase["samples"]
    stats = summary(sessions)
    training_share = sum(1 for _, on in samples if on) / max(len(samples), 1)
    deep = db_rows(db, "SELECT id, created_at FROM reward_versions WHERE tier = 'deep' ORDER BY id")
    report = {**stats, "seconds": SECONDS, "deep_training_samples": len(samples),
              "deep_training_share": training_share, "deep_versions_saved": len(deep),
              "note": "latency = click to the confirming status line, measured in the page (Chromium, headless); "
                      "4 sessions + 1 observer page, app and browser on the same machine"}
    write_json(ARTIFACTS / "load_test.json", report)
    print(f"\nload: {stats['labels']} labels in {SECONDS} s by {SESSIONS} sessions {stats['per_session']}, "
          f"median {stats['median_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms (max {stats['max_ms']:.0f} ms); "
          f"deep tier training in {training_share:.0%} of {len(samples)} samples")

    problems = [f"session {s.index}: {p}" for s in sessions for p in s.problems]
    assert not problems, problems                     # every click confirmed, no error in the status line
    assert not [t for s in sessions for t in s.toasts], [s.toasts for s in sessions]   # no error pop-ups
    assert not result["observer_toasts"], result["observer_toasts"]
    assert not [e for s in sessions for e in s.page_errors] and not result["observer_errors"]
    assert all(len(s.labels) >= 3 for s in sessions), stats["per_session"]
    assert {lb.kind for s in sessions for lb in s.labels} == {"stars", "thumbs", "pairwise"}
    # The deep tier was training during the minute: the observer's status line said so at the start and at
    # (nearly) every sample; one update ending and the next starting (every 16 new pairs) may fall on a sample.
    assert samples and samples[0][1] and training_share >= 0.9, samples
    assert rc == 0, f"the app did not stop cleanly on Ctrl+C sent at {signalled} (rc={rc}):\n{log[-3000:]}"
    assert "Traceback" not in log and "deep reward training failed" not in log, log[-5000:]
    # Nothing lost, nothing extra, each label as confirmed (kind, completion(s), value, one session id each).
    db_problems = check_db(db, prompts, info["last_label_id"], sessions)
    assert not db_problems, db_problems
    n_new = db_rows(db, "SELECT count(*) FROM feedback WHERE id > ?", [info["last_label_id"]])[0][0]
    assert n_new == stats["labels"]
    assert len(deep) >= 1          # the update that ran during the minute was saved (stopped cleanly on Ctrl+C)


# ---------------------------------------------------------------------------------------- a full queue
def _http(url: str, method: str, path: str, body=None, timeout: float = 30):
    """One request; returns (status, parsed JSON or text). A hang shows up as a timeout error."""
    u = urllib.parse.urlsplit(url)
    con = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        con.request(method, path, body=json.dumps(body) if body is not None else None,
                    headers={"Content-Type": "application/json"})
        r = con.getresponse()
        text = r.read().decode()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text
    finally:
        con.close()


class _Stream(threading.Thread):
    """Reads one session's event stream (/gradio_api/queue/data) until its event completes."""

    def __init__(self, url: str, session_hash: str):
        super().__init__(daemon=True)
        self.url, self.session_hash = url, session_hash
        self.completed: dict | None = None
        self.error: str | None = None
        self.started = threading.Event()         # the event left the queue and runs

    def run(self):
        u = urllib.parse.urlsplit(self.url)
        con = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        try:
            con.request("GET", f"/gradio_api/queue/data?session_hash={self.session_hash}")
            r = con.getresponse()
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_starts":
                    self.started.set()
                if msg.get("msg") == "process_completed":
                    self.completed = msg
                    break
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            con.close()


def test_a_full_queue_answers_busy_at_once_and_serves_afterwards(seeded, tmp_path):
    from playwright.sync_api import expect
    seed_path, info = seeded
    db = _copy(seed_path, str(tmp_path / "queue.duckdb"))
    prompt_id, (prompt_text, _) = next(iter(info["prompts"].items()))
    # More than a page load sends at once (checked below): with 2, a loaded machine (CI with -n 2) refused some
    # of the page's own load events as "busy", their overlays showed "Error" for good, and open_app waited for
    # them until its timeout. The checks are the same with any bound: the queue is filled up to it below.
    max_queue = 16
    with running_app(db, "--max-queue", str(max_queue)) as (url, proc), browser() as b:
        status, config = _http(url, "GET", "/config")
        assert status == 200
        loads = [d for d in config["dependencies"] if any(t[1] == "load" for t in d.get("targets", []))]
        assert 0 < len(loads) < max_queue, f"{len(loads)} page-load events could fill a queue of {max_queue}"
        page = b.new_page(viewport={"width": 1500, "height": 1300})
        page_errors = []
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        open_app(page, url)
        page.locator("#library input").click()
        page.get_by_role("option").filter(has_text=prompt_text).first.click()
        page.click("#load-prompt-btn")
        expect(page.locator("#status")).to_contain_text(f"completions of prompt #{prompt_id} loaded", timeout=60_000)

        fn = {d.get("api_name"): d["id"] for d in config["dependencies"]}
        # Two slow requests (8 completions of 512 tokens) run at a time (the generate limit); once both run, short
        # ones join at once (no pause) until the queue has refused several in a row. It is full then for as long
        # as the two run (a few seconds at least; joining slowly let them finish before it filled).
        slow = ["Count from one to one thousand, one number per line.", 8, 512, 0.0, 1.0, "1", "base"]
        short = [prompt_text, 1, 8, 0.0, 1.0, "1", "base"]

        def join(data):
            h = uuid.uuid4().hex[:11]
            t0 = time.perf_counter()
            code, body = _http(url, "POST", "/gradio_api/queue/join",
                               {"data": data, "fn_index": fn["generate"], "session_hash": h,
                                "event_data": None, "trigger_id": None})
            if code == 200:
                accepted.append(_Stream(url, h))
                accepted[-1].start()
            return code, body, time.perf_counter() - t0
        accepted, refused = [], []
        for _ in range(2):
            assert join(slow)[0] == 200
        for s in accepted:
            assert s.started.wait(120), "a generation did not start"
        for _ in range(2 * max_queue + 8):
            code, body, seconds = join(short)
            refused = [] if code == 200 else refused + [(code, body, seconds)]
            if len(refused) >= 3:
                break
        assert len(refused) >= 3, f"the queue never filled: {len(accepted)} requests accepted"
        assert len(accepted) <= 2 + max_queue, len(accepted)
        for code, body, _ in refused:          # answered at once (no hang: the request had a 30 s timeout)
            assert code == 503 and "Queue is full" in body["detail"], (code, body)

        # The browser, while the queue is full: a label click gets Gradio's busy message, nothing is saved.
        before = page.locator("#status").inner_text()
        page.click("#up-0")
        toast = page.get_by_test_id("toast-body").filter(has_text="busy")
        expect(toast.first).to_be_visible(timeout=30_000)
        toast_text = toast.first.inner_text()
        assert "currently busy" in toast_text and "try again" in toast_text.lower(), toast_text
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "queue-busy.png"))
        # Gradio flags the event's output as failed ("Error" badge); the message line itself is unchanged.
        after = page.locator("#status").inner_text()
        assert before.strip() in after and "saved" not in after, (before, after)

        # Cut the generations short (the Stop button's endpoint, per session) and let the queue drain.
        deadline = time.time() + 180
        while any(s.is_alive() for s in accepted) and time.time() < deadline:
            for s in accepted:
                if s.is_alive():
                    _http(url, "POST", "/gradio_api/run/stop", {"data": [], "session_hash": s.session_hash})
            time.sleep(0.5)
        for s in accepted:
            s.join(5)
            assert s.completed is not None and s.completed.get("success"), (s.error, s.completed)

        # Served normally afterwards: the same click saves a label.
        page.click("#up-0")
        expect(page.locator("#status")).to_contain_text("thumbs saved: up for A (label #", timeout=60_000)
        saved = int(page.locator("#status").inner_text().rsplit("#", 1)[1].split(")")[0])
        h = uuid.uuid4().hex[:11]
        code, _ = _http(url, "POST", "/gradio_api/queue/join",
                        {"data": [prompt_text, 1, 8, 0.0, 1.0, "1", "base"], "fn_index": fn["generate"],
                         "session_hash": h, "event_data": None, "trigger_id": None})
        assert code == 200
        s = _Stream(url, h)
        s.run()
        assert s.completed is not None and s.completed.get("success"), (s.error, s.completed)
        assert not page_errors, page_errors
        stop_gracefully(proc)
    rows = db_rows(db, "SELECT id, kind, up FROM feedback WHERE id > ?", [info["last_label_id"]])
    assert rows == [(saved, "thumbs", True)]     # the refused click saved nothing, the second exactly one label


def test_max_queue_must_be_at_least_one():
    import subprocess
    import sys
    from tests.browser import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--max-queue", "0", "--no-browser"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-queue must be at least 1" in r.stderr
