"""Handlers of the Generate & Rate and History tabs as functions of plain values, without a browser."""
import pytest

from rlhf_studio import StudioError
from rlhf_studio.studio.ui import generate as gen
from rlhf_studio.studio.ui import history as hist
from rlhf_studio.studio.ui.common import ERROR_PREFIX


def test_generate_tab_helpers():
    assert gen.parse_seed("") is None and gen.parse_seed(" 7 ") == 7 and gen.parse_seed("-3") == -3
    with pytest.raises(StudioError, match="whole number"):
        gen.parse_seed("1.5")
    assert gen.generated_message([4, 5, 6], ["length", "stop", "eos"]) == \
        "3 completions saved (ids 4–6) — stopped early"
    assert gen.ranking_order("c a b", 3) == [2, 0, 1]
    for order, n, msg in (("A B", 3, "exactly once"), ("A A B", 3, "exactly once"), ("A D", 3, "'D' is not"),
                          ("A", 0, "generate or load")):
        with pytest.raises(StudioError, match=msg):
            gen.ranking_order(order, n)
    sug = {"a": 11, "b": 13, "p": 0.52, "prompt_id": 2}
    assert gen.suggestion_view(sug, [11, 12, 13]) == (
        "A", "C", "the reward model is least sure about A vs C (p=0.52); choose the winner")
    la, lb, msg = gen.suggestion_view(sug, [20, 21], show_p=False)
    assert (la, lb) == (None, None) and "prompt #2" in msg and "p=" not in msg
    assert gen.rubric_md(["overall", "help"], ["Good?", "[x](javascript:1)"]) == \
        "**Rubric** — **overall**: Good? · **help**: \\[x\\](javascript:1)"


def test_history_tables_and_withdrawal(studio):
    cs = studio.generate("Say hi", n=2, max_new_tokens=2, seed=0)
    fid = studio.rate(cs[0].id, 4, annotator="ana")
    studio.critique(cs[1].id, "too short", annotator="bo")
    md, labels, comps, prompts = hist.history_tables(studio, kind="stars")
    assert md == "1 prompts · 2 completions · 1 labels shown" and list(labels["id"]) == [fid]
    assert "policy" in comps.columns and "policy" not in hist.history_tables(studio, policy=False)[2].columns
    assert len(hist.history_tables(studio, search="too short")[1]) == 1
    assert len(hist.history_tables(studio, annotator="AN")[1]) == 1
    refused = hist.withdraw_label(studio, fid, None, "bo", "s1", owner=False)
    assert refused.startswith(ERROR_PREFIX)                          # an annotator withdraws only their own
    assert hist.withdraw_label(studio, fid, "typo", "owner", "s1", owner=True).startswith(f"withdrew label #{fid}")
    assert hist.history_tables(studio, kind="stars")[0].endswith("0 labels shown")
    assert hist.withdraw_label(studio, None, None, "x", None, owner=True).startswith(ERROR_PREFIX)
