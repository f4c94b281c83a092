"""The app as a user meets it: `launch.py` in a subprocess, headless Chromium clicking through every kind of
feedback, then the DuckDB file checked row by row; and gradio_client against the same server."""
import duckdb
import pytest

from tests.browser import ARTIFACTS, browser, generate_in_page, open_app, running_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _wait_status(page, text, timeout=120_000):
    from playwright.sync_api import expect
    expect(page.locator("#status")).to_contain_text(text, timeout=timeout)


def test_generate_and_every_feedback_kind_in_the_browser(tmp_path):
    db = str(tmp_path / "ui.duckdb")
    with running_app(db) as (url, _), browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1300})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_app(page, url)
        generate_in_page(page, "Write a haiku about rain", max_new_tokens=16, seed=7)
        _wait_status(page, "4 completions saved")
        texts = [page.locator(f"#comp-{i} textarea").input_value() for i in range(4)]
        assert all(isinstance(t, str) for t in texts) and any(t.strip() for t in texts)

        # 1. stars by clicking, 2. stars by keyboard shortcut on the selected card
        page.locator("#stars-0 input[value='5']").click()
        _wait_status(page, "5 stars for A")
        page.locator("#score-2").click()
        page.keyboard.press("3")
        _wait_status(page, "3 stars for C")
        # a slip undone with `z`: the label is withdrawn and C's stars cleared; then C rated again
        page.keyboard.press("z")
        _wait_status(page, "withdrew label #2 (stars: 3 stars for #")
        from playwright.sync_api import expect
        expect(page.locator("#stars-2 input[value='3']")).not_to_be_checked()
        page.locator("#stars-2 input[value='4']").click()
        _wait_status(page, "4 stars for C")
        # 3. thumbs down with a reason tag, thumbs up
        page.locator("#tags-1 input[name='incorrect']").check()
        page.click("#down-1")
        _wait_status(page, "down for B")
        page.click("#up-3")
        _wait_status(page, "up for D")
        # 4. pairwise choice: A vs B, B wins
        page.locator("#winner input[value='b']").click()
        page.click("#compare-btn")
        _wait_status(page, "A vs B: b")
        # 5. ranking of all four; a bad ranking first (not a permutation): clear message, nothing saved
        page.locator("#ranking textarea").fill("B A")
        page.click("#rank-btn")
        _wait_status(page, "every completion shown exactly once")
        page.locator("#ranking textarea").fill("B A D C")
        page.click("#rank-btn")
        _wait_status(page, "B > A > D > C")
        # 6. critique with a corrected rewrite, on D
        page.locator("#critique-target input").click()
        page.get_by_role("option", name="D").click()
        page.locator("#critique textarea").fill("Not a haiku: wrong syllable count.")
        page.locator("#rewrite textarea").fill("Rain on tin roofs sings\nsoft drums for the sleeping town\npuddles hold the sky")
        page.click("#critique-btn")
        _wait_status(page, "critique and rewrite saved for D")

        # History tab shows the labels
        page.get_by_role("tab", name="History").click()
        page.click("#history-refresh")
        expect(page.locator("#history-summary")).to_contain_text("8 labels shown", timeout=60_000)
        # withdraw the thumbs up on D (label #5) there: one label fewer shown
        page.get_by_text("Withdraw a label given by mistake").click()
        page.locator("#withdraw-id input").fill("5")
        page.locator("#withdraw-reason input").fill("meant B")
        page.click("#withdraw-btn")
        expect(page.locator("#withdraw-status")).to_contain_text("withdrew label #5 (thumbs: up for #",
                                                                 timeout=60_000)
        expect(page.locator("#history-summary")).to_contain_text("7 labels shown", timeout=60_000)
        page.get_by_role("tab", name="Generate & Rate").click()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "generate-and-rate.png"), full_page=True)

        # A new criterion: thumbs under it are stored under it; the stars shown are the chosen criterion's
        page.get_by_text("Criteria annotators judge by").click()
        page.locator("#new-criterion input").fill("helpfulness")
        page.locator("#new-criterion-desc input").fill("Does it help?")
        page.click("#add-criterion-btn")
        _wait_status(page, "criterion 'helpfulness' saved")
        page.locator("#criterion input").click()
        page.get_by_role("option", name="helpfulness").click()
        expect(page.locator("#stars-0 input[value='5']")).not_to_be_checked()     # A's 5 stars are "overall"
        page.click("#up-0")
        _wait_status(page, "up for A")
        page.locator("#criterion input").click()
        page.get_by_role("option", name="overall").click()
        expect(page.locator("#stars-0 input[value='5']")).to_be_checked()
        # a bad seed is refused and the cards stay as they were
        page.locator("#seed input, #seed textarea").first.fill("abc")
        page.click("#generate-btn")
        _wait_status(page, "the seed must be a whole number")
        expect(page.locator("#comp-0 textarea")).to_have_value(texts[0])
        page.locator("#seed input, #seed textarea").first.fill("")
        # "Next prompt" to a prompt without completions: no card of the previous prompt stays to be labelled
        page.get_by_text("Add prompts to the library").click()
        page.locator("#new-prompts textarea").fill("Name a bird.")
        page.click("#add-prompts-btn")
        _wait_status(page, "1 prompts in the library")
        page.click("#next-prompt-btn")
        _wait_status(page, "press Generate for completions")
        expect(page.locator("#prompt textarea")).to_have_value("Name a bird.")
        expect(page.locator("#comp-0")).to_be_hidden()
        assert not errors, errors

    # The app is stopped: every acknowledged label is in the file.
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute("SELECT id, source, text, corrects_id FROM completions ORDER BY id").fetchall()
        assert len(rows) == 5
        model_ids = [r[0] for r in rows if r[1] == "model"]
        assert [r[2] for r in rows if r[1] == "model"] == texts
        human = [r for r in rows if r[1] == "human"][0]
        assert human[2].startswith("Rain on tin roofs sings") and human[3] == model_ids[3]
        fb = con.execute("SELECT kind, completion_id, other_completion_id, stars, up, winner, ranking, text, tags, "
                         "rewrite_completion_id, annotator FROM feedback ORDER BY id").fetchall()
        kinds = [f[0] for f in fb]
        assert kinds == ["stars", "stars", "stars", "thumbs", "thumbs", "pairwise", "ranking", "critique",
                         "rewrite", "thumbs"]
        assert con.execute("SELECT criterion, up, completion_id FROM feedback ORDER BY id DESC LIMIT 1").fetchall() \
            == [("helpfulness", True, model_ids[0])]
        fb = fb[:-1]
        A, B, C, D = model_ids
        assert (fb[0][1], fb[0][3]) == (A, 5)
        assert (fb[1][1], fb[1][3]) == (C, 3)
        assert (fb[2][1], fb[2][3]) == (C, 4)
        assert (fb[3][1], fb[3][4], list(fb[3][8])) == (B, False, ["incorrect"])
        assert (fb[4][1], fb[4][4]) == (D, True)
        assert (fb[5][1], fb[5][2], fb[5][5]) == (A, B, "b")
        assert list(fb[6][6]) == [B, A, D, C]
        assert (fb[7][1], fb[7][7]) == (D, "Not a haiku: wrong syllable count.")
        assert fb[8][1] == D and fb[8][9] == human[0]
        assert {f[10] for f in fb} == {"local"}
        assert con.execute("SELECT feedback_id, reason FROM retractions ORDER BY id").fetchall() == [
            (2, None), (5, "meant B")]


def test_gradio_client_endpoints(tmp_path):
    from gradio_client import Client
    db = str(tmp_path / "client.duckdb")
    with running_app(db) as (url, _):
        client = Client(url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)
        names = set(api["named_endpoints"])
        assert {"/generate", "/rate_a", "/compare", "/rank", "/critique"} <= names, sorted(names)
        job = client.submit("Name a colour", 2, 8, 0.7, 0.9, "3", "base", api_name="/generate")
        outputs = job.result(timeout=180)
        status, text_a = outputs[0], outputs[1]
        assert "2 completions saved" in status
        # The completion ids live in the client's session state: rating A needs only stars and criterion.
        res = client.predict("4", "overall", api_name="/rate_a")
        assert "4 stars for A" in res[0]
        bad = client.predict("A", "A", "a", "overall", api_name="/compare")   # a completion against itself
        assert "Error" in bad[0]
    with duckdb.connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM completions").fetchall()[0][0] == 2
        assert con.execute("SELECT stars FROM feedback").fetchall() == [(4,)]
        first = con.execute("SELECT c.text FROM completions c JOIN feedback f ON f.completion_id = c.id").fetchall()
        assert first[0][0] == (text_a["value"] if isinstance(text_a, dict) else text_a)
