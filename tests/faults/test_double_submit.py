"""Double submit: a double click in the browser and a retried API request each store one label (idempotency key),
while a deliberate second label (a new click after the first was confirmed) is kept."""
import re

import duckdb
import pytest

from tests.browser import browser, open_app, running_app
from tests.studios import open_studio

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def labelled_db(tmp_path_factory, lm):
    path = str(tmp_path_factory.mktemp("double") / "double.duckdb")
    with open_studio(path, lm) as s:
        cs = s.generate("Name a musical instrument.", n=4, max_new_tokens=6, seed=0)
    return path, cs[0].prompt_id, [c.id for c in cs]


def _rows(db, sql, args=()):
    with duckdb.connect(db, read_only=True) as con:
        return con.execute(sql, list(args)).fetchall()


def _label_id(status: str) -> int:
    m = re.search(r"label #(\d+)", status)
    assert m, status
    return int(m.group(1))


def test_double_clicks_store_one_label_each(labelled_db):
    from playwright.sync_api import expect
    db, prompt_id, ids = labelled_db
    with running_app(db) as (url, _), browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1300})
        open_app(page, url)
        page.locator("#library input").click()
        page.get_by_role("option").first.click()
        page.click("#load-prompt-btn")
        status = page.locator("#status")
        expect(status).to_contain_text("4 completions", timeout=60_000)

        page.dblclick("#up-0")
        expect(status).to_contain_text("thumbs saved: up for A", timeout=60_000)
        page.locator("#winner input[value='a']").check()
        page.dblclick("#compare-btn")
        expect(status).to_contain_text("choice saved", timeout=60_000)
        page.locator("#ranking textarea, #ranking input").first.fill("D C B A")
        page.dblclick("#rank-btn")
        expect(status).to_contain_text("ranking saved", timeout=60_000)
        page.wait_for_timeout(1500)            # let any second request of a double click land
        # a deliberate second thumbs-up on A, after the first was confirmed, is a new label
        first = _label_id(status.inner_text())
        page.click("#up-0")
        expect(status).not_to_contain_text(f"label #{first})", timeout=60_000)
        expect(status).to_contain_text("thumbs saved: up for A", timeout=60_000)
        page.wait_for_timeout(1000)
    kinds = dict(_rows(db, "SELECT kind, count(*) FROM feedback GROUP BY kind"))
    assert kinds == {"thumbs": 2, "pairwise": 1, "ranking": 1}, kinds
    keys = [r[0] for r in _rows(db, "SELECT idempotency_key FROM feedback")]
    assert all(k and k.startswith("ui:") for k in keys) and len(set(keys)) == len(keys), keys


def test_a_retried_api_request_is_stored_once(labelled_db):
    from gradio_client import Client
    db = labelled_db[0]
    with running_app(db) as (url, _):
        client = Client(url, verbose=False)
        out = client.predict("Name a bird.", 3, 8, 0.7, 0.9, "5", "base", api_name="/generate")
        assert "3 completions saved" in out[0], out[0]
        a = client.predict([], "overall", "retry-key-1", api_name="/thumbs_down_b")
        again = client.predict([], "overall", "retry-key-1", api_name="/thumbs_down_b")      # the same request, retried
        other = client.predict([], "overall", "retry-key-2", api_name="/thumbs_down_b")      # a new request
        for res in (a, again, other):
            assert "thumbs saved: down for B" in res[0], res[0]
        assert _label_id(a[0]) == _label_id(again[0]) != _label_id(other[0])
        # without a key (a plain API caller) every call is a new label
        n1 = _label_id(client.predict("3", "overall", "", api_name="/rate_c")[0])
        n2 = _label_id(client.predict("3", "overall", "", api_name="/rate_c")[0])
        assert n1 != n2
    rows = _rows(db, "SELECT f.kind, count(*) FROM feedback f JOIN prompts p ON p.id = f.prompt_id "
                     "WHERE p.text = 'Name a bird.' GROUP BY ALL ORDER BY ALL")
    assert rows == [("stars", 2), ("thumbs", 2)], rows
