"""The Train tab's handlers (studio/ui/train_actions.py) called as functions of plain values, on a real Studio,
without a browser and without training: refusals, what the refresh shows of a run, the lists it offers."""
from types import SimpleNamespace

import gradio as gr

from rlhf_studio.studio.auth import Account, Accounts
from rlhf_studio.studio.ui import train_actions as act

SETTINGS = [2, 2, 4, 1, 1e-4, 0.05, 4, 1, 0]
BO = SimpleNamespace(username="bo", session_hash="s-bo")


def _out(values) -> dict:
    return dict(zip(act.REFRESH_OUTPUTS, values))


def test_refresh_shows_the_latest_run_its_lists_and_sends_nothing_twice(studio):
    first = _out(act.refresh(studio, "fast", None, None, None))
    assert first["status"] == "no run yet" and first["adapter_ids"] == []
    assert "latest fast" in first["reward_choice"] and first["unpin"]["visible"] is False
    rid = studio.store.create_run("ppo", {"steps": 4}, {"reward_tier": "fast", "reward_version": 2})
    studio.store.set_run_status(rid, "failed", error="<no compiler>")
    studio.store.add_run_metrics(rid, 2, {"reward_mean": 0.5, "kl": 0.1})
    aid = studio.store.add_adapter("ppo-test", b"w", {}, "base/model")
    now = _out(act.refresh(studio, "fast", None, first["known"], None))
    assert now["status"] == f"Run **{rid}**: failed · step 2/4 — &lt;no compiler&gt;" and now["progress"] == 50.0
    assert now["resume_id"]["choices"] == [(f"run {rid} (failed)", rid)]
    assert now["export_id"]["choices"][0][1] == aid and now["adapter_ids"] == [aid]
    assert now["runs"]["lineage"].iloc[0] == "reward fast v2"
    again = _out(act.refresh(studio, "fast", None, now["known"], None))
    assert all(again[k] == gr.skip() for k in ("status", "progress", "curves", "samples", "runs", "adapters",
                                               "resume_id", "export_id"))


def test_actions_answer_in_words_and_refuse_annotators(studio):
    assert "fill in Steps, Seed" in act.on_launch(studio, None, *SETTINGS[1:8], "", "fast")
    assert "steps must be &gt;= 1" in act.on_launch(studio, -1, *SETTINGS[1:], "fast")
    assert "no run" in act.on_resume(studio, "run 7") and "choose a cancelled" in act.on_resume(studio, None)
    assert "whole number" in act.on_resume(studio, "seven")
    assert "choose an adapter" in act.on_export(studio, None, "x", False)
    assert "no adapter" in act.on_export(studio, "adapter-9", "x", False)
    assert "Estimated memory" in act.on_settings(studio, *SETTINGS, "off", "fast")
    md, unpin = act.on_choice(studio, "deep", {"version": 3, "tier": "fast"})
    assert "pinned reward-model version 3** (fast tier)" in md and unpin["visible"] is True
    studio.accounts = Accounts({"ana": Account("ana", "pw-ana", "owner"), "bo": Account("bo", "pw-bo")})
    assert "may not launch training" in act.on_launch(studio, *SETTINGS, "fast", "off", None, BO)
    assert "may not cancel training" in act.on_cancel(studio, BO)
    assert "may not resume training" in act.on_resume(studio, 1, BO)
    assert "may not export adapters" in act.on_export(studio, 1, "x", False, BO)
    assert act.refresh(studio, "fast", None, None, BO) == [gr.skip()] * len(act.REFRESH_OUTPUTS)
    studio.blind = True
    assert act.adapter_choices(studio, BO) == gr.skip()
    assert act.adapter_choices(studio, SimpleNamespace(username="ana"))["choices"] == ["base"]
