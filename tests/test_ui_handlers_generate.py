"""The Generate & Rate tab's handlers (studio/ui/generate_actions.py) called as functions of plain values, on a
real Studio, without a browser: what each returns for the tab's outputs and what it stores."""
from types import SimpleNamespace

import pytest

from rlhf_studio.components.generation import MAX_N
from rlhf_studio.studio.auth import Account, Accounts
from rlhf_studio.studio.ui import generate_actions as act
from rlhf_studio.studio.ui.common import ERROR_PREFIX

ANA = SimpleNamespace(username="ana", session_hash="s-ana")       # an owner's request
BO = SimpleNamespace(username="bo", session_hash="s-bo")          # an annotator's


@pytest.fixture
def logins(studio):
    studio.accounts = Accounts({"ana": Account("ana", "pw-ana", "owner"), "bo": Account("bo", "pw-bo")})
    return studio


def _value(update):
    return update["value"] if isinstance(update, dict) else update


def _shown(studio, n=2):
    """Generate n short completions through the handler; returns (every streamed output list, the last one)."""
    outs = list(act.on_generate(studio, "Say hi", n, 2, 0.7, 0.9, "1", "base", None))
    return outs, outs[-1]


def test_generate_streams_then_shows_the_saved_completions(studio):
    outs, last = _shown(studio)
    assert len(outs) >= 2 and all(len(o) == 2 + act.SLOTS + MAX_N for o in outs)
    assert outs[0][:2] == [[], "Generating…"]
    ids = last[0]
    assert len(ids) == 2 and last[1].startswith("2 completions saved")
    cards, texts = last[2:2 + MAX_N], last[2 + MAX_N:2 + 2 * MAX_N]
    assert [c["visible"] for c in cards] == [True, True] + [False] * (MAX_N - 2)
    assert [_value(t) for t in texts[:2]] == list(studio.completions()["text"])
    refused = next(act.on_generate(studio, "Say hi", 2, 2, 0.7, 0.9, "1.5", "base", None))
    assert refused[1].startswith(ERROR_PREFIX) and "whole number" in refused[1]
    assert act.on_stop(None) == "nothing is generating in this tab"


def test_labels_from_the_cards_are_saved_once_per_key(studio):
    ids = _shown(studio)[1][0]
    out = act.on_star(studio, 0, ids, "4", "overall", "k1", None)
    assert len(out) == act.LABEL_OUTPUTS and out[0].startswith("rating saved: 4 stars for A (label #")
    again = act.on_star(studio, 0, ids, "4", "overall", "k1", None)       # a double click: the same label
    assert again[0] == out[0] and len(studio.store.query("SELECT id FROM feedback")) == 1
    assert act.on_star(studio, 5, ids, "4", "overall", "k1", None) == [act.gr.skip()] * act.LABEL_OUTPUTS
    assert "down for B" in act.on_thumb(studio, 1, False, ids, ["too short"], None, "k2", None)[0]
    assert "A vs B: a" in act.on_compare(studio, ids, "A", "B", "a", "overall", "k3", None)[0]
    assert "choose A wins" in act.on_compare(studio, ids, "A", "B", None, "overall", "k3", None)[0]
    assert "B &gt; A" in act.on_rank(studio, ids, "b a", "overall", "k4", None)[0]
    assert "exactly once" in act.on_rank(studio, ids, "a", "overall", "k4", None)[0]
    crit = act.on_critique(studio, ids, "B", "too short", "Hello there!", "overall", "k5", None)
    assert crit[0] == "critique and rewrite saved for B" and crit[-2:] == [{"value": "", "__type__": "update"}] * 2
    assert act.on_critique(studio, [], "A", "x", "", "overall", "k6", None)[-2:] == [act.gr.skip()] * 2
    kinds = set(studio.store.query("SELECT kind FROM feedback")["kind"])
    assert kinds == {"stars", "thumbs", "pairwise", "ranking", "critique", "rewrite"}


def test_undo_puts_back_the_star_shown_and_the_criterion_switch_shows_mine(studio):
    ids = _shown(studio)[1][0]
    act.on_star(studio, 0, ids, "2", "overall", "k1", None)
    act.on_star(studio, 0, ids, "5", "overall", "k2", None)
    out = act.on_undo(studio, ids, "k3", None)
    assert out[0].startswith("withdrew") and _value(out[act.LABEL_OUTPUTS]) == "2"     # card A: back to 2 stars
    assert [_value(u) for u in act.on_criterion(studio, ids, "overall", None)][:2] == ["2", None]
    assert [_value(u) for u in act.on_criterion(studio, ids, "honesty", None)][:2] == [None, None]


def test_library_next_and_load_show_one_prompts_completions(studio):
    assert act.on_next(studio, "overall", None)[2].startswith(ERROR_PREFIX)     # an empty library
    status, box = act.on_add(studio, "First question\n\nSecond question", None)
    assert status == "2 prompts in the library" and box["value"] == ""
    nxt = act.on_next(studio, "overall", None)
    assert nxt[0] == [] and "press Generate" in nxt[2] and len(nxt) == 3 + act.SLOTS + MAX_N
    ids = _shown(studio)[1][0]
    pid = int(studio.completions().iloc[0]["prompt_id"])
    act.on_star(studio, 1, ids, "3", "overall", "k1", None)
    loaded = act.on_load(studio, pid, "overall", None)
    assert loaded[0] == ids and loaded[1]["value"] == "Say hi" and "2 completions of prompt" in loaded[2]
    stars = loaded[3 + 2 * MAX_N:3 + 3 * MAX_N]
    assert [_value(s) for s in stars[:2]] == [None, "3"]
    assert act.on_load(studio, None, "overall", None)[2].startswith(ERROR_PREFIX)
    choices = act.library_choices(studio)["choices"]
    assert {label for label, _ in choices} == {"First question", "Second question", "Say hi"}


def test_owner_only_actions_refuse_an_annotator(logins, tmp_path):
    s = logins
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo\n")
    assert "may not add prompts" in act.on_add(s, "x", BO)[0]
    assert "may not import prompts" in act.on_import_prompts(s, str(f), BO)
    assert act.on_import_prompts(s, str(f), ANA) == "2 prompts imported"
    assert "may not add criteria" in act.on_add_criterion(s, "honesty", "Is it true?", BO)[0]
    out = act.on_add_criterion(s, "honesty", "Is it true?", ANA)
    assert "'honesty' saved" in out[0] and "honesty" in out[1]["choices"] and "Is it true?" in out[2]
    assert act.page_load(s, BO)[2]["visible"] is False and act.page_load(s, ANA)[2]["visible"] is False
    assert "may not add prompts" in act.on_starter(s, BO)[0]


def test_blind_mode_hides_scores_and_policies_from_annotators(logins):
    s = logins
    s.blind = True
    ids = _shown(s)[1][0]
    assert [_value(u) for u in act.scores_for(s, ids, BO)] == [act.BLIND_SCORE] * MAX_N
    assert act.BLIND_SCORE not in [_value(u) for u in act.scores_for(s, ids, ANA)]
    refused = next(act.on_generate(s, "Say hi", 1, 2, 0.7, 0.9, "", "adapter-1", BO))
    assert "blind mode" in refused[1]
