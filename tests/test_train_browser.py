"""A tiny PPO run launched from the Train tab in a real browser; the live curves and the run table update."""
import re

import duckdb
import pytest

from studio import Studio
from tests.browser import ARTIFACTS, browser, running_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_launch_tiny_ppo_from_train_tab(tmp_path, lm):
    db = str(tmp_path / "train.duckdb")
    s = Studio(db, model=lm)
    s.reward.settings.deep_every = 0
    for p in ["Name a fruit.", "Say hello.", "Name a colour."]:
        cs = s.generate(p, n=3, max_new_tokens=6, seed=0)
        s.rank([c.id for c in cs])
    # an earlier run that went on otherwise than asked: the tab shows its notes until the new run starts
    earlier = s.store.create_run("ppo", {"steps": 2}, {})
    s.store.set_run_status(earlier, "completed")
    s.store.add_run_note(earlier, "the compiled training passes failed (InductorError: <no compiler>); "
                                  "the run trains eagerly instead")
    s.close()
    from playwright.sync_api import expect
    with running_app(db) as (url, _), browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(url)
        page.get_by_role("tab", name="Train (PPO)").click()
        expect(page.locator("#ppo-status")).to_contain_text(
            "Note: the compiled training passes failed (InductorError: <no compiler>); the run trains eagerly",
            timeout=30_000)                  # as text: the angle brackets are not swallowed as a tag
        for elem, value in [("ppo-steps", "3"), ("ppo-batch", "2"), ("ppo-new-tokens", "6"), ("ppo-epochs", "1"),
                            ("ppo-ckpt", "1")]:
            page.locator(f"#{elem} input").fill(value)
        page.locator("#ppo-tier input[value='fast']").click()
        page.locator("#ppo-compile input[value='auto']").click()   # compiled on a GPU; eager on this CPU
        page.click("#ppo-launch")
        # The curves draw as soon as the first step lands.
        expect(page.locator("#ppo-status")).to_contain_text(re.compile(r"step [123]/3"), timeout=600_000)
        expect(page.locator("#ppo-curves .scatterlayer .trace").first).to_be_attached(timeout=60_000)
        expect(page.locator("#ppo-status")).to_contain_text("completed", timeout=600_000)
        expect(page.locator("#ppo-status")).to_contain_text("step 3/3")
        # the runs and adapters tables read as text, not as the browser's "[object Object]"
        expect(page.locator("#ppo-runs")).to_contain_text("compile auto", timeout=30_000)
        expect(page.locator("#ppo-runs")).to_contain_text("reward fast v")
        for table in ("#ppo-runs", "#ppo-adapters"):
            expect(page.locator(table)).not_to_contain_text("[object Object]")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "train-tab.png"), full_page=True)
    with duckdb.connect(db, read_only=True) as con:
        assert con.execute("SELECT status, notes FROM runs WHERE id > ?", [earlier]).fetchall() == [("completed", None)]
        assert con.execute("SELECT config->>'compile' FROM runs WHERE id > ?", [earlier]).fetchall() == [("auto",)]
        assert con.execute("SELECT max(step) FROM run_metrics").fetchall()[0][0] == 3
        assert con.execute("SELECT count(*) FROM adapters").fetchall()[0][0] == 1
