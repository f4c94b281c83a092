"""The Reward model tab's handlers (studio/ui/reward.py) called as functions of plain values, on a real Studio
with a fast-tier refit, without a browser."""
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from rlhf_studio.studio.auth import Account, Accounts
from rlhf_studio.studio.ui import reward

BO = SimpleNamespace(username="bo", session_hash="s-bo")
ANA = SimpleNamespace(username="ana", session_hash="s-ana")


def _row(i: int):
    """What Gradio passes when row i of a table is selected."""
    return gr.SelectData(None, {"index": [i, 0], "value": None, "selected": True})


def _out(values) -> dict:
    return dict(zip(reward.REFRESH_OUTPUTS, values))


def test_refresh_refit_pin_and_blind_likes(studio):
    first = _out(reward.refresh(studio))
    assert "**fast tier**: no version yet" in first["status"]
    cs = studio.generate("Name a fruit.", n=3, max_new_tokens=3, seed=0)
    studio.rank([c.id for c in cs])
    refit = reward.on_refit(studio)
    assert refit.startswith("fast tier refit: version ")
    now = _out(reward.refresh(studio, first["sent"]))
    assert f"**fast tier** v{refit.rsplit(' ', 1)[1]} · " in now["status"]
    assert len(now["best"]) == 3 and now["worst"]["score"].is_monotonic_increasing
    again = _out(reward.refresh(studio, now["sent"]))
    assert all(again[k] == gr.skip() for k in ("status", "curves", "hist", "versions", "best"))

    table = now["versions"]
    pin, msg = reward.on_select(studio, _row(0), table)
    assert pin == {"version": int(table["id"].iloc[0]), "tier": "fast"} and msg == gr.skip()
    assert f"will use version {pin['version']}" in reward.pin_md(pin) and "latest version" in reward.pin_md(None)
    bare = pd.DataFrame({"id": [9], "tier": ["fast"], reward.PPO_COLUMN: ["no"]})
    assert "no weights" in reward.on_select(studio, _row(0), bare)[1]

    studio.accounts = Accounts({"ana": Account("ana", "pw-ana", "owner"), "bo": Account("bo", "pw-bo")})
    studio.blind = True
    hidden = _out(reward.refresh(studio, None, BO))
    assert [hidden[k] for k in ("hist", "best", "worst")] == [gr.skip()] * 3      # no scores for annotators
    assert isinstance(_out(reward.refresh(studio, None, ANA))["best"], pd.DataFrame)


def test_owner_actions_refuse_annotators_and_say_what_is_missing(studio):
    assert "give the id" in reward.on_export(studio, None, "x")
    assert "deep tier updates every 5 new pairs" in reward.on_every(studio, 5)
    assert "choose a file" in reward.on_import(studio, None, "hh")
    studio.accounts = Accounts({"ana": Account("ana", "pw-ana", "owner"), "bo": Account("bo", "pw-bo")})
    for refused in (reward.on_refit(studio, BO), reward.on_deep(studio, 3, BO), reward.on_every(studio, 3, BO),
                    reward.on_import(studio, None, "hh", BO), reward.on_export(studio, 1, "x", BO),
                    reward.on_select(studio, _row(0), None, BO)[1]):
        assert "your role (annotator) may not" in refused, refused
