"""Logins that resist guessing: salted slow hashes, `rlhf-studio hash-password`, legacy entries accepted with a
warning, failed logins limited per client address and overall, lock-outs an owner sees, every failure logged."""
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from rlhf_studio import StudioError
from rlhf_studio.studio.auth import Account, Accounts, LoginLimits, hash_password
from tests.browser import ROOT


@pytest.fixture
def quick_scrypt(monkeypatch):
    """A cheaper scrypt cost for the tests of limits (each stored hash carries its own parameters)."""
    monkeypatch.setattr("studio.auth.SCRYPT_N", 2**10)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _accounts(**limits) -> tuple[Accounts, Clock]:
    clock = Clock()
    acc = Accounts({"ana": Account("ana", hash_password("ana-secret"), "owner"),
                    "bo": Account("bo", hash_password("bo-secret"), "annotator")},
                   limits=LoginLimits(**{"per_address": 3, "overall": 10, "window_s": 600, "delay_s": 0, **limits}),
                   clock=clock)
    return acc, clock


def test_passwords_are_stored_salted_and_slow():
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a.startswith("scrypt:32768:8:1:") and a != b                   # a fresh salt each time
    assert "correct horse" not in a
    acc = Account("ana", a, "owner")
    assert acc.check("correct horse") and not acc.check("correct horsf") and not acc.check("")
    with pytest.raises(StudioError, match="damaged"):
        Account("ana", "scrypt:16384:8:1:not-base64!:x")
    with pytest.raises(StudioError, match="empty"):
        hash_password("")


def test_plain_and_sha256_entries_still_work_with_a_warning(tmp_path, caplog, quick_scrypt):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": [
        {"username": "ana", "password": hash_password("a-pw"), "role": "owner"},
        {"username": "bo", "password": "plain-pw"},
        {"username": "cy", "password": "sha256:" + hashlib.sha256(b"cy-pw").hexdigest()}]}))
    with caplog.at_level(logging.WARNING, "rlhf_studio.auth"):
        acc = Accounts.from_file(str(path))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "bo, cy" in warned and "hash-password" in warned and "ana" not in warned.split("password of")[1][:8]
    assert acc.check_login("bo", "plain-pw") and acc.check_login("cy", "cy-pw") and acc.check_login("ana", "a-pw")


def test_guesses_from_one_address_are_locked_out_whichever_names_they_try(caplog, quick_scrypt):
    acc, clock = _accounts()
    with caplog.at_level(logging.WARNING, "rlhf_studio.auth"):
        for name in ("ana", "bo", "nobody"):                    # spread over names: still one address
            assert not acc.check_login(name, "guess", "10.0.0.9")
    assert [r.getMessage() for r in caplog.records][0].startswith("failed login for user 'ana' from 10.0.0.9")
    assert len(caplog.records) == 3                             # every failure logged
    assert not acc.check_login("ana", "ana-secret", "10.0.0.9")  # locked out: even the right password
    assert "refused: too many failed logins from 10.0.0.9" in caplog.records[-1].getMessage()
    assert acc.check_login("ana", "ana-secret", "10.0.0.7")     # another address is not
    assert [r["address"] for r in acc.lockouts()] == ["10.0.0.9"]
    clock.t += 601
    assert acc.check_login("ana", "ana-secret", "10.0.0.9")     # the window has passed
    assert acc.lockouts() == []


def test_guesses_spread_over_addresses_hit_the_overall_limit(quick_scrypt):
    acc, clock = _accounts()
    for i in range(10):
        assert not acc.check_login("ana", f"guess{i}", f"10.0.1.{i}")
    assert acc.lockouts()[0]["address"] == "*"
    assert not acc.check_login("ana", "ana-secret", "10.0.2.1")     # nobody gets in while it lasts
    acc.clear_lockouts()                                            # an owner who knows what happened
    assert acc.check_login("ana", "ana-secret", "10.0.2.1")


def test_hash_password_writes_an_entry_the_studio_accepts(tmp_path, monkeypatch, capsys, quick_scrypt):
    import io
    from rlhf_studio.studio.cli import main
    path = tmp_path / "users.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "hash-password", "--auth-file", str(path),
                        "--user", "ana", "--role", "owner"], input="s3cret pass\n", capture_output=True, text=True,
                       timeout=120)                              # the command as a user runs it
    assert r.returncode == 0 and "added user 'ana'" in r.stdout, r.stderr
    for argv, stdin in ((["--user", "bo"], "bo pass\n"), (["--user", "ana"], "new pass\n")):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        assert main(["hash-password", "--auth-file", str(path), *argv]) == 0
    text = path.read_text()
    assert not any(pw in text for pw in ("s3cret", "bo pass", "new pass"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    acc = Accounts.from_file(str(path))
    assert acc.role("ana") == "owner" and acc.role("bo") == "annotator"     # ana's role kept
    assert acc.check_login("ana", "new pass") and acc.check_login("bo", "bo pass")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert main(["hash-password"]) == 0 and Account("u", capsys.readouterr().out.strip()).check("x")
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert main(["hash-password", "--auth-file", str(path)]) == 2 and "needs --user" in capsys.readouterr().err


def _login(url: str, user: str, password: str) -> int:
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        return urllib.request.urlopen(url + "login", data=data, timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_app_counts_failures_by_the_clients_address_and_owners_see_the_lock_out(studio, tmp_path, caplog):
    """Through Gradio's own /login: its auth callback gets no request, so the address comes from the app's
    middleware. Five wrong passwords from 127.0.0.1 lock that address out; the owner's line names it."""
    from rlhf_studio.studio.app import lockout_line
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": [{"username": "ana", "password": hash_password("ana-pw"),
                                           "role": "owner"}]}))
    path.chmod(0o600)
    app = studio.launch(auth_file=str(path), port=None, max_queue=8)
    studio.accounts.limits.delay_s = 0
    url = app.local_url
    assert _login(url, "ana", "ana-pw") == 200
    with caplog.at_level(logging.WARNING, "rlhf_studio.auth"):
        for i in range(5):
            assert _login(url, ["ana", "bo"][i % 2], f"guess{i}") == 400
    failures = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert len(failures) == 5 and all("from 127.0.0.1" in m for m in failures), failures
    assert _login(url, "ana", "ana-pw") == 400                  # locked out, right password or not
    df = studio.login_lockouts()
    assert df["address"].tolist() == ["127.0.0.1"] and int(df["failures"].iloc[0]) >= 5
    assert "127.0.0.1" in lockout_line(studio)
    studio.clear_login_lockouts()
    assert _login(url, "ana", "ana-pw") == 200
    assert lockout_line(studio).startswith("Logins: no address")
