"""Collaborators on a shared studio: accounts with roles, attribution, concurrent labelling, refusals."""
import json
import urllib.error
import urllib.request

import duckdb
import pytest

from rlhf_studio import Studio
from tests.browser import ARTIFACTS, browser, running_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _status(url):
    try:
        return urllib.request.urlopen(url, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def _login(page, url, user, password):
    page.goto(url)
    page.locator("input[type=text], input[name=username]").first.fill(user)
    page.locator("input[type=password]").first.fill(password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#prompt", timeout=60_000)


@pytest.fixture
def shared_db(tmp_path, lm):
    db = str(tmp_path / "team.duckdb")
    s = Studio(db, model=lm)
    cs = s.generate("Explain why the sky is blue", n=3, max_new_tokens=8, seed=0)
    s.close()
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"users": [
        {"username": "ana", "password": "owner-pass-123", "role": "owner"},
        {"username": "bo", "password": "annot-pass-456", "role": "annotator"}]}))
    return db, str(users), [c.id for c in cs]


def test_roles_refusals_and_concurrent_labelling(shared_db):
    db, users, ids = shared_db
    with running_app(db, "--auth-file", users) as (url, _):
        # Nothing is served without a login.
        assert _status(url + "config") == 401
        assert _status(url + "gradio_api/info") == 401

        # An annotator calling an owner endpoint directly is refused by the server.
        from gradio_client import Client
        bo = Client(url, auth=("bo", "annot-pass-456"), verbose=False)
        for args, api in [((20, 4, 8, 1, 1e-4, 0.05, 8, 0, 0, "fast"), "/launch_ppo"),
                          ((), "/refit_fast"),
                          (("a new prompt",), "/add_prompts")]:
            out = bo.predict(*args, api_name=api)
            text = out[0] if isinstance(out, (list, tuple)) else out
            assert "your role (annotator) may not" in text, (api, out)
        with pytest.raises(Exception):
            Client(url, auth=("bo", "wrong"), verbose=False)

        with browser() as b:
            owner = b.new_page(viewport={"width": 1400, "height": 1200})
            annot = b.new_page(viewport={"width": 1400, "height": 1200})
            _login(owner, url, "ana", "owner-pass-123")
            _login(annot, url, "bo", "annot-pass-456")
            # The annotator does not see owner controls; the owner does.
            from playwright.sync_api import expect
            expect(annot.get_by_role("tab", name="Train (PPO)")).to_be_hidden(timeout=30_000)
            expect(annot.get_by_text("Add prompts to the library")).to_be_hidden()
            expect(owner.get_by_role("tab", name="Train (PPO)")).to_be_visible()
            expect(owner.get_by_text("Add prompts to the library")).to_be_visible()
            # Both load the same completions and rate the same one at the same time.
            for page in (owner, annot):
                page.locator("#library input").click()
                page.get_by_role("option").first.click()
                page.click("#load-prompt-btn")
                expect(page.locator("#status")).to_contain_text("3 completions", timeout=60_000)
            owner.locator("#stars-0 input[value='5']").click()
            annot.locator("#stars-0 input[value='2']").click()
            expect(owner.locator("#status")).to_contain_text("5 stars for A", timeout=60_000)
            expect(annot.locator("#status")).to_contain_text("2 stars for A", timeout=60_000)
            annot.locator("#winner input[value='a']").click()
            annot.click("#compare-btn")
            expect(annot.locator("#status")).to_contain_text("choice saved", timeout=60_000)
            ARTIFACTS.mkdir(exist_ok=True)
            annot.screenshot(path=str(ARTIFACTS / "annotator-view.png"), full_page=True)

        # An annotator undoes his own labels only, newest first, and cannot withdraw the owner's.
        undone = [bo.predict("", api_name="/undo_label")[0] for _ in range(3)]
        assert "withdrew label" in undone[0] and "pairwise" in undone[0], undone
        assert "withdrew label" in undone[1] and "2 stars for" in undone[1], undone
        assert "Nothing to undo" in undone[2], undone
        refusals = " | ".join(bo.predict(i, "", api_name="/withdraw_label") for i in (1, 2))   # ana's, his
        assert "already withdrawn" in refusals and "given by 'ana'" in refusals, refusals

    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute("SELECT annotator, completion_id, stars FROM feedback WHERE kind = 'stars' "
                           "ORDER BY annotator").fetchall()
        assert rows == [("ana", ids[0], 5), ("bo", ids[0], 2)]      # neither overwrote the other
        assert con.execute("SELECT f.annotator, r.annotator, f.kind FROM retractions r JOIN feedback f "
                           "ON f.id = r.feedback_id ORDER BY r.id").fetchall() == [("bo", "bo", "pairwise"),
                                                                                  ("bo", "bo", "stars")]
        assert con.execute("SELECT annotator FROM feedback_current").fetchall() == [("ana",)]
        assert con.execute("SELECT annotator FROM feedback WHERE kind = 'pairwise'").fetchall() == [("bo",)]
        assert con.execute("SELECT count(*) FROM prompts").fetchall()[0][0] == 1     # the refused add wrote nothing
        assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 0


def test_bad_auth_file_is_refused(tmp_path):
    import subprocess
    import sys
    from tests.browser import ROOT
    f = tmp_path / "users.json"
    f.write_text(json.dumps({"users": [{"username": "x", "password": "y", "role": "annotator"}]}))
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--db", str(tmp_path / "a.duckdb"),
                        "--auth-file", str(f), "--no-browser"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "at least one user must have the role 'owner'" in r.stderr
