"""The command line as a user runs it: flags, --share never without a login, offline share keeps serving."""
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.browser import ROOT, running_app

pytestmark = pytest.mark.slow


def readme_flags() -> set[str]:
    """Every flag named in the first column of the README's command-line table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Command line", 1)[1].split("\n\n", 2)[1]
    firsts = [row.split(" | ")[0] for row in table.splitlines() if row.startswith("| `")]
    return {f for cell in firsts for f in re.findall(r"`(--[a-z-]+)", cell)}


def test_help_lists_every_flag():
    flags = readme_flags()
    assert len(flags) >= 14 and {"--export-dir", "--auth-file", "--quantization"} <= flags
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in flags:
        assert flag in out, flag
    assert "hash-password" in out and "hash-password" in (ROOT / "README.md").read_text()


def test_every_readme_flag_parses_to_its_setting():
    from rlhf_studio.studio.cli import parse_args
    argv = {"--db": "x.duckdb", "--model": "some/model", "--host": "0.0.0.0", "--port": "8001", "--share": None,
            "--auth": "u:p", "--auth-file": "users.json", "--export-dir": "out", "--blind": None,
            "--no-browser": None, "--max-queue": "3", "--device": "cpu", "--dtype": "fp32", "--quantization": "4bit",
            "--cluster": "ray://head:10001", "--cluster-workers": "2"}
    assert set(argv) == readme_flags()                      # a flag added to the README is added here too
    a = parse_args([x for k, v in argv.items() for x in ([k] if v is None else [k, v])])
    assert (a.db, a.model, a.host, a.port, a.share, a.auth, a.auth_file, a.export_dir, a.blind, a.no_browser,
            a.max_queue, a.device, a.dtype, a.quantization) == \
        ("x.duckdb", "some/model", "0.0.0.0", 8001, True, "u:p", "users.json", "out", True, True, 3, "cpu", "fp32",
         "4bit")
    assert a.cluster == "ray://head:10001" and parse_args([]).cluster is None
    assert a.cluster_workers == 2 and parse_args([]).cluster_workers == 1
    d = parse_args([])
    assert (d.db, d.model, d.host, d.port, d.share, d.blind, d.max_queue, d.export_dir, d.quantization) == \
        ("rlhf-studio.duckdb", "embedded", "127.0.0.1", 7860, False, False, None, None, None)
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "int3"])
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "2bit"])


@pytest.mark.parametrize("argv, says", [
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--auth", "nocolon"], "USER:PASSWORD"),
    (["--auth-file", "/nonexistent/users.json"], "cannot read the auth file"),
    (["--export-dir", "/proc/no-exports-here"], "--export-dir /proc/no-exports-here"),
    (["--model", "/nonexistent/model-folder"], "does not exist"),
    (["--device", "cpu", "--quantization", "8bit"], "8bit quantization needs a CUDA GPU"),
    (["--cluster-workers", "2"], "--cluster-workers N needs --cluster"),
])
def test_flags_with_bad_values_are_refused_before_serving(tmp_path, capsys, argv, says):
    """In-process: each is refused with exit code 2 before a model is loaded or a port opened."""
    from rlhf_studio.studio.cli import main
    assert main(["--db", str(tmp_path / "x.duckdb"), "--no-browser", *argv]) == 2
    assert says in capsys.readouterr().err


def test_bad_auth_and_bad_db_are_refused(tmp_path):
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


def test_one_start_with_the_login_blind_export_and_model_flags(tmp_path):
    """--auth-file, --blind, --export-dir, --model, --device, --dtype, --host and --max-queue in one real start:
    the login is the file's, failures are logged with the address, exports go where asked, cpu/fp32 is used."""
    import json
    from rlhf_studio.studio.auth import hash_password
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"users": [{"username": "ana", "password": hash_password("ana-pw"),
                                            "role": "owner"}]}))
    users.chmod(0o600)
    exports = tmp_path / "my exports"
    db = str(tmp_path / "flags.duckdb")
    with running_app(db, "--auth-file", str(users), "--blind", "--export-dir", str(exports), "--model", "embedded",
                     "--device", "cpu", "--dtype", "fp32", "--host", "127.0.0.1", "--max-queue", "5") as (url, _):
        assert _status(url + "config") == 401
        assert _login(url, "ana", "wrong") == 400 and _login(url, "ana", "ana-pw") == 200
        log = open(tmp_path / "flags.log").read()
    assert f"Exports from the app go to {exports} (blind labelling)" in log
    assert "on cpu (float32)" in log and "failed login for user 'ana' from 127.0.0.1" in log
    assert exports.is_dir()


def _login(url: str, user: str, password: str) -> int:
    import urllib.parse
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        return urllib.request.urlopen(url + "login", data=data, timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code
