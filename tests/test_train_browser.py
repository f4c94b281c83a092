"""A tiny PPO run launched from the Train tab in a real browser; the live curves and the run table update."""
import re

import duckdb
import pytest

from rlhf_studio import Studio
from tests.browser import ARTIFACTS, browser, generate_in_page, open_app, running_app

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
    pinned = s.train_reward_model(tier="fast")        # a version with stored weights, for PPO to use
    s.close()
    from playwright.sync_api import expect
    with running_app(db) as (url, _), browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1400})
        open_app(page, url)

        # Shortcuts after fewer cards: card B picked among 2, then 1 card shown; "5" stars the card shown
        # (the selection stayed on the hidden B and the key did nothing)
        page.locator("#n input[type=number]").fill("2")
        page.locator("#n input[type=number]").press("Enter")
        generate_in_page(page, "Name a tree.", 8, 1)
        expect(page.locator("#status")).to_contain_text("2 completions saved", timeout=120_000)
        page.locator("#score-1").click()
        page.locator("#n input[type=number]").fill("1")
        page.locator("#n input[type=number]").press("Enter")
        page.click("#generate-btn")
        expect(page.locator("#status")).to_contain_text("1 completions saved", timeout=120_000)
        page.locator("#header").click()
        page.keyboard.press("5")
        expect(page.locator("#status")).to_contain_text("5 stars for A", timeout=30_000)
        expect(page.locator("#card-0")).to_have_class(re.compile("rlhf-selected"))

        # Pin a reward-model version in the Reward tab (below, before the launch): the Train tab says so.
        page.get_by_role("tab", name="Reward model").click()
        pin_row = page.locator("#reward-versions").get_by_role("row", name=re.compile(rf"^{pinned} fast yes"))

        def pin():
            page.get_by_role("tab", name="Reward model").click()
            pin_row.get_by_role("gridcell").first.click(timeout=30_000)
            expect(page.locator("#reward-pin")).to_contain_text(f"will use version {pinned}", timeout=30_000)
            page.get_by_role("tab", name="Train (PPO)").click()
            expect(page.locator("#ppo-reward-choice")).to_contain_text(f"pinned reward-model version {pinned}",
                                                                       timeout=30_000)
        page.get_by_role("tab", name="Train (PPO)").click()
        expect(page.locator("#ppo-status")).to_contain_text(
            "Note: the compiled training passes failed (InductorError: <no compiler>); the run trains eagerly",
            timeout=30_000)                  # as text: the angle brackets are not swallowed as a tag
        # the memory estimate without editing a field; the empty sample table with its real headers
        expect(page.locator("#ppo-memory")).to_contain_text("Estimated memory", timeout=30_000)
        expect(page.locator("#ppo-samples")).to_contain_text("response")
        # (the action messages that stay, unpinning and an unknown run id: test_train_tab_messages_... below)

        for elem, value in [("ppo-steps", "3"), ("ppo-batch", "2"), ("ppo-new-tokens", "6"), ("ppo-epochs", "1"),
                            ("ppo-ckpt", "1")]:
            page.locator(f"#{elem} input").fill(value)
        page.locator("#ppo-compile input[value='auto']").click()   # compiled on a GPU; eager on this CPU
        pin()                                                      # this launch uses the pinned version
        page.click("#ppo-launch")
        expect(page.locator("#ppo-action")).to_contain_text(f"with pinned reward-model version {pinned}",
                                                            timeout=60_000)
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
        # the new adapter is offered for export, for generating and for blind compare, without a reload
        expect(page.locator("#export-id input")).to_have_value("")
        page.locator("#export-id input").click()
        expect(page.get_by_role("option", name=re.compile(r"^adapter-1 "))).to_be_visible(timeout=30_000)
        page.keyboard.press("Escape")
        page.get_by_role("tab", name="Generate & Rate").click()
        page.locator("#adapter input").click()
        expect(page.get_by_role("option", name="adapter-1", exact=True)).to_be_visible(timeout=30_000)
        page.keyboard.press("Escape")
        page.get_by_role("tab", name="Blind compare").click()
        page.locator("#blind-policy-1 input").click()
        expect(page.get_by_role("option", name="adapter-1", exact=True)).to_be_visible(timeout=30_000)
        page.keyboard.press("Escape")
    with duckdb.connect(db, read_only=True) as con:
        assert con.execute("SELECT status, notes FROM runs WHERE id > ?", [earlier]).fetchall() == [("completed", None)]
        assert con.execute("SELECT config->>'compile' FROM runs WHERE id > ?", [earlier]).fetchall() == [("auto",)]
        assert con.execute("SELECT lineage->>'reward_version' FROM runs WHERE id > ?", [earlier]).fetchall() == [
            (str(pinned),)]
        assert con.execute("SELECT max(step) FROM run_metrics").fetchall()[0][0] == 3
        assert con.execute("SELECT count(*) FROM adapters").fetchall()[0][0] == 1


# ----------------------------------------------------------------- the tabs' wiring, without a browser (fast)
def _app(studio):
    """The whole Blocks app (not served), its components by elem_id and its event handlers."""
    from rlhf_studio.studio.app import build_app
    demo = build_app(studio, max_queue=None)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    return demo, by_id, [f for f in demo.fns.values() if f.fn is not None]


def _triggers(demo, f):
    return {(demo.blocks.get(i), event) for i, event in f.targets}


def _handler(fns, name, output=None):
    """The one handler called `name` (that writes `output`, where several share the name)."""
    found = {f.fn: f for f in fns if f.fn.__name__ == name and (output is None or output in f.outputs)}
    assert len(found) == 1, (name, found)         # one function (a refresh may be wired to several events)
    return next(iter(found.values()))


def test_train_tab_messages_fields_estimate_and_policy_lists(studio):
    """Launch / Cancel / Resume answer in their own area, which the 2 s refresh does not redraw; timers refresh
    without a "processing" overlay; Resume of an unknown run says so (it raised NotFound: a bare "Error" toast);
    the run and adapter fields are lists that start empty (number fields showed "0"); the memory estimate is
    computed on load and on a change of the reward tier or the training passes; the sample table has its headers
    before any run; a new adapter reaches the Generate and Blind compare policy lists without a page reload."""
    import gradio as gr
    import pandas as pd
    from rlhf_studio.studio.ui.train import SAMPLE_COLUMNS
    demo, by_id, fns = _app(studio)
    action, status = by_id["ppo-action"], by_id["ppo-status"]
    ticks = [f for f in fns if any(isinstance(b, gr.Timer) and e == "tick" for b, e in _triggers(demo, f))]
    assert len(ticks) == 3              # the Train and Reward tabs' refreshes, the watch panel's
    assert all(f.show_progress == "hidden" for f in ticks)
    assert all(action not in f.outputs for f in ticks)
    for name in ("on_launch", "on_cancel", "on_resume"):
        f = _handler(fns, name)
        assert f.outputs == [action] and status not in f.outputs
    launch = _handler(fns, "on_launch").fn
    assert "steps must be &gt;= 1" in launch(-3, 8, 32, 4, 1e-4, 0.05, 16, 5, 0, "fast", "off", None, None)
    assert "fill in Steps" in launch(None, 8, 32, 4, 1e-4, 0.05, 16, 5, 0, "fast", "off", None, None)

    for elem in ("ppo-resume-id", "export-id"):
        assert isinstance(by_id[elem], gr.Dropdown) and by_id[elem].value is None
    resume = _handler(fns, "on_resume").fn
    for rid in (999, "0"):
        msg = resume(rid, None)
        assert msg.startswith("**Error:**") and "no run" in msg and str(rid) in msg, msg
    assert "choose a cancelled" in resume(None, None)
    export = next(f.fn for f in fns if f.fn.__name__ == "on_export" and by_id["export-id"] in f.inputs)
    msg = export(7, "nowhere", False, None)          # a folder name inside the export folder
    assert msg.startswith("**Error:**") and "no adapter" in msg and "7" in msg, msg

    settings = _handler(fns, "on_settings")
    trig = _triggers(demo, settings)
    assert {(by_id["ppo-tier"], "change"), (by_id["ppo-compile"], "change")} <= trig
    assert any(e == "load" for _, e in trig)
    assert "Estimated memory" in settings.fn(20, 8, 32, 4, 1e-4, 0.05, 16, 5, 0, "auto", "fast")

    assert list(by_id["ppo-samples"].value["headers"]) == SAMPLE_COLUMNS
    refresh = _handler(fns, "refresh", status)
    out = dict(zip(refresh.outputs, refresh.fn("deep", None, None)))
    assert out[status] == "no run yet" and list(out[by_id["ppo-samples"]].columns) == SAMPLE_COLUMNS
    ids_state = [o for o in refresh.outputs if isinstance(o, gr.State) and out[o] == []]
    assert len(ids_state) == 1                                # the adapter ids: none yet
    aid = studio.store.add_adapter("ppo-test", b"w", {}, "base/model")
    out = dict(zip(refresh.outputs, refresh.fn("deep", None, None)))
    assert out[ids_state[0]] == [aid]
    assert out[by_id["export-id"]]["choices"][0][1] == aid
    # when those ids change, the Generate tab's policy list and then the Blind compare lists and win rates
    on_change = [f for f in fns if (ids_state[0], "change") in _triggers(demo, f)]
    assert len(on_change) == 1 and on_change[0].outputs == [by_id["adapter"]]
    assert f"adapter-{aid}" in on_change[0].fn()["choices"]
    blind = [by_id["blind-policy-1"], by_id["blind-policy-2"], by_id["blind-winrates"]]
    cmp_refresh = [f for f in fns if f.outputs == blind and any(isinstance(b, gr.Tab) for b, _ in _triggers(demo, f))]
    assert len(cmp_refresh) == 1                              # also on opening the Blind compare tab
    one, two, rates = cmp_refresh[0].fn()
    assert f"adapter-{aid}" in one["choices"] and "value" not in two and isinstance(rates, pd.DataFrame)
    assert any(f.outputs == [by_id["adapter"]] and any(isinstance(b, gr.Tab) for b, _ in _triggers(demo, f))
               for f in fns)                                  # and on opening the Generate tab


def test_blind_compare_refuses_bad_max_new_tokens(studio):
    """0 (or an empty field) used to become 64 new tokens without a word."""
    demo, by_id, fns = _app(studio)
    gen = _handler(fns, "on_generate", by_id["blind-reveal"]).fn
    for bad in (0, -5, None, 5000):
        out = gen("Say hi", "base", "adapter-9", bad)
        assert "Error" in out[2] and "Max new tokens" in out[2], (bad, out)
    assert len(studio.completions()) == 0


def test_timer_refreshes_send_only_what_changed(studio):
    """The Train (2 s) and Reward (3 s) tabs' timer refreshes rebuild and send an output only when its data
    changed since that browser tab's last refresh (per-session state): every tick used to redraw the curves and
    tables, and the Reward tab rescored every completion."""
    import gradio as gr
    demo, by_id, fns = _app(studio)
    skip = gr.skip()

    def ticks(name, status_id, args):
        f = _handler(fns, name, by_id[status_id])
        state = next(o for o in f.outputs if isinstance(o, gr.State) and o in f.inputs)

        def tick(sent):
            out = dict(zip(f.outputs, f.fn(*args, sent)))
            return out, out[state]
        return tick

    def sent_again(out, *elem_ids):
        return [e for e in elem_ids if not (isinstance(out[by_id[e]], dict) and out[by_id[e]] == skip)]

    train = ticks("refresh", "ppo-status", ["deep", None])
    first, known = train(None)
    assert first[by_id["ppo-status"]] == "no run yet"
    again, known = train(known)
    assert sent_again(again, "ppo-status", "ppo-progress", "ppo-curves", "ppo-samples", "ppo-runs",
                      "ppo-adapters") == []
    rid = studio.store.create_run("ppo", {"steps": 3}, {})
    studio.store.set_run_status(rid, "running")
    studio.store.add_run_metrics(rid, 1, {"reward_mean": 0.5, "kl": 0.1})
    changed, known = train(known)
    assert sent_again(changed, "ppo-status", "ppo-progress", "ppo-curves", "ppo-samples", "ppo-runs") == [
        "ppo-status", "ppo-progress", "ppo-curves", "ppo-samples", "ppo-runs"]
    assert "step 1/3" in changed[by_id["ppo-status"]]
    assert sent_again(train(known)[0], "ppo-status", "ppo-curves", "ppo-runs") == []
    assert sent_again(train(None)[0], "ppo-curves", "ppo-adapters") == ["ppo-curves", "ppo-adapters"]  # new tab

    reward = ticks("refresh", "reward-status", [])
    first, sent = reward(None)
    assert "no version yet" in first[by_id["reward-status"]]
    again, sent = reward(sent)
    assert sent_again(again, "reward-status", "reward-curves", "reward-calibration", "reward-hist",
                      "reward-versions") == []
    cs = studio.generate("Name a fruit.", n=3, max_new_tokens=4, seed=0)
    studio.rank([c.id for c in cs])
    studio.train_reward_model(tier="fast")
    changed, sent = reward(sent)
    assert sent_again(changed, "reward-status", "reward-curves", "reward-calibration", "reward-hist",
                      "reward-versions") == ["reward-status", "reward-curves", "reward-calibration", "reward-hist",
                                             "reward-versions"]
    assert sent_again(reward(sent)[0], "reward-status", "reward-curves", "reward-hist", "reward-versions") == []
