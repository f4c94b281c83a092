"""The Blind compare tab's handlers (studio/ui/compare.py) called as functions of plain values, on a real
Studio, without a browser: refusals before generating, the vote saved once and revealed (or not, in blind
mode)."""
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from rlhf_studio.studio.auth import Account, Accounts
from rlhf_studio.studio.ui import compare

BO = SimpleNamespace(username="bo", session_hash="s-bo")
ANA = SimpleNamespace(username="ana", session_hash="s-ana")


def test_blind_pair_refusals_vote_and_reveal(studio):
    assert "two different policies" in compare.on_generate(studio, "Say hi", "base", "base", 4)[2]
    assert "Max new tokens" in compare.on_generate(studio, "Say hi", "base", "adapter-1", 0)[2]
    assert "generate a blind pair first" in compare.on_vote(studio, "a", None)[0]
    cs = studio.generate("Say hi", n=2, max_new_tokens=2, seed=0)
    secret = {"left": cs[0].id, "right": cs[1].id, "left_policy": "base", "right_policy": "adapter-7"}
    msg, rates, kept = compare.on_vote(studio, "a", dict(secret))
    assert "Left was **base**, right was **adapter-7**" in msg and kept is None
    assert isinstance(rates, pd.DataFrame)
    compare.on_vote(studio, "a", dict(secret))                          # sent twice: one label
    assert (studio.feedback(history=True)["kind"] == "pairwise").sum() == 1
    one, two, _ = compare.choices(studio)
    assert one["choices"] == ["base"] and two["value"] == "base"

    studio.accounts = Accounts({"ana": Account("ana", "pw-ana", "owner"), "bo": Account("bo", "pw-bo")})
    studio.blind = True
    assert "nothing to compare yet" in compare.on_generate(studio, "Say hi", "base", "base", 4, BO)[2]
    msg, rates, _ = compare.on_vote(studio, "b", dict(secret, left=cs[1].id, right=cs[0].id), BO)
    assert "policies stay hidden" in msg and "adapter-7" not in msg and rates == gr.skip()
    assert compare.refresh(studio, BO) == (gr.skip(), gr.skip(), None)
    assert compare.refresh(studio, ANA)[0]["choices"] == ["base"]
