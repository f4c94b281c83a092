"""The command line as a user runs it: flags, --share never without a login, offline share keeps serving."""
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.browser import ROOT, running_app

pytestmark = pytest.mark.slow


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--db", "--model", "--host", "--port", "--share", "--auth", "--no-browser"):
        assert flag in out


def test_bad_auth_and_bad_db_are_refused(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--auth", "nocolon", "--no-browser"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "USER:PASSWORD" in r.stderr
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"\x00garbage" * 100)
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--db", str(junk), "--no-browser"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a DuckDB" in r.stderr and str(junk) in r.stderr


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def test_share_without_auth_generates_a_password_and_serves_locally_offline(tmp_path):
    db = str(tmp_path / "share.duckdb")
    with running_app(db, "--share", timeout=300) as (url, proc):
        log = open(tmp_path / "share.log").read()
        m = re.search(r"user 'studio', password '([^']+)'", log)
        assert m and len(m.group(1)) >= 20
        # Either a public link was made, or the studio says clearly that it could not and serves locally.
        assert "Public link" in log or "Could not create a public share link" in log
        assert _status(url) == 200                      # the login page
        assert _status(url + "config") == 401           # nothing behind it without the password
        assert _status(url + "gradio_api/info") == 401


def test_sigterm_stops_as_gracefully_as_ctrl_c(tmp_path):
    """`kill` (SIGTERM, as a service manager stops it) closes the studio and the DuckDB file cleanly: exit 0."""
    import signal
    db = str(tmp_path / "term.duckdb")
    with running_app(db) as (url, proc):
        assert _status(url) == 200
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    log = open(tmp_path / "term.log").read()
    assert rc == 0 and "Stopping ..." in log, log[-2000:]
    import duckdb
    duckdb.connect(db).close()               # the file was closed: another process may open it now


def test_ctrl_c_stops_an_app_started_with_sigint_ignored(tmp_path):
    """A non-interactive shell starts background jobs (`rlhf-studio &` in a script, a test runner launched with
    `&`) with SIGINT ignored, and Python keeps an inherited ignore: an explicit Ctrl+C (`kill -INT`) then did
    nothing and the load test waited 90 s. The app installs its own SIGINT handler."""
    import signal
    db = str(tmp_path / "int.duckdb")
    with running_app(db, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as (url, proc):
        assert _status(url) == 200
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
    log = open(tmp_path / "int.log").read()
    assert rc == 0 and "Stopping ..." in log, log[-2000:]
