"""Blind mode on the server side, without a browser: each handler that would name a policy or show a reward score
checks who calls it (an annotator, or anyone where no owner logged in), not only what the page hides. The browser
walk is tests/faults/test_app_faults.py::test_blind_mode_shows_an_annotator_no_policy_and_no_score."""
import gradio as gr
import pandas as pd
import pytest

from rlhf_studio.studio.auth import Account, Accounts

POLICY = "secret-policy"


def _app(studio):
    from rlhf_studio.studio.app import build_app
    demo = build_app(studio, max_queue=None)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    return by_id, [f for f in demo.fns.values() if f.fn is not None]


def _handler(fns, name, output):
    found = {f.fn: f for f in fns if f.fn.__name__ == name and output in f.outputs}
    assert len(found) == 1, (name, found)
    return next(iter(found.values()))


def _values(outputs) -> str:
    """Everything a handler sends, as text (skipped outputs send nothing)."""
    return " ".join(v.to_json(date_format="iso") if isinstance(v, pd.DataFrame) else v.to_json() if hasattr(v, "to_plotly_json")
                    else str(v) for v in outputs if not (isinstance(v, dict) and v.get("__type__") == "update"
                                                         and len(v) == 1))


@pytest.fixture
def blind_studio(studio):
    cs = studio.generate("Say hi", n=2, max_new_tokens=2, seed=0)
    aid = studio.store.add_adapter(POLICY, b"w", {}, "base/model")
    tuned = studio.store.add_completions([{"prompt_id": cs[0].prompt_id, "text": "tuned", "adapter_id": aid}])[0]
    studio.compare(cs[0].id, tuned, "b")
    studio.compare(cs[0].id, cs[1].id, "a")
    studio.train_reward_model(tier="fast")
    studio.accounts = Accounts({"ana": Account("ana", "pw-ana-123", "owner"),
                                "bo": Account("bo", "pw-bo-456", "annotator")})
    studio.blind = True
    return studio, [cs[0].id, cs[1].id, tuned]


def test_blind_handlers_reveal_policies_and_scores_to_a_logged_in_owner_only(blind_studio):
    studio, ids = blind_studio
    by_id, fns = _app(studio)
    bo, ana = gr.Request(username="bo"), gr.Request(username="ana")

    history = _handler(fns, "load", by_id["history-completions"]).fn
    assert "policy" not in history("all", "", "", False, request=bo)[2].columns
    assert "policy" in history("all", "", "", False, request=ana)[2].columns

    reward = _handler(fns, "refresh", by_id["reward-liked-most"]).fn
    likes = [3, 5, 6]                                           # the histogram, liked most and least
    assert "score" not in _values([reward(None, request=bo)[i] for i in likes])
    assert "score" in _values([reward(None, request=ana)[i] for i in likes])

    dash = _handler(fns, "load", by_id["dash-leaderboard"]).fn
    assert POLICY not in _values(dash("overall", False, request=bo))
    assert POLICY in _values(dash("overall", False, request=ana))

    train = _handler(fns, "refresh", by_id["ppo-adapters"]).fn
    assert POLICY not in _values(train("deep", None, None, request=bo))
    assert POLICY in _values(train("deep", None, None, request=ana))

    for name in ("choices", "refresh"):
        policies = _handler(fns, name, by_id["blind-winrates"]).fn
        assert "adapter-" not in _values(policies(request=bo))
        assert "adapter-" in _values(policies(request=ana))
    vote = next(f.fn for f in fns if f.fn.__name__ == "on_vote" and by_id["blind-reveal"] in f.outputs)
    secret = {"left": ids[0], "right": ids[2], "left_policy": "base", "right_policy": f"adapter-{ids[2]}"}
    assert "adapter-" not in _values(vote(dict(secret), request=bo))
    assert "adapter-" in _values(vote(dict(secret), request=ana))

    card = _handler(fns, "on_load", by_id["score-0"]).fn
    assert "reward (fast" not in _values(card(_prompt(studio), "overall", request=bo))
    assert "reward (fast" in _values(card(_prompt(studio), "overall", request=ana))
    generate = _handler(fns, "on_generate", by_id["status"]).fn
    refused = list(generate("Say hi", 1, 8, 0.8, 0.95, "0", "adapter-1", request=bo))
    assert len(refused) == 1 and "blind mode" in refused[0][1]

    apply_role = next(f for f in fns if f.fn.__name__ == "apply_role")
    hidden = apply_role.fn.blind_hidden
    assert by_id["adapter"] in hidden and by_id["blind-winrates"] in hidden
    for request, shown in ((bo, False), (ana, True)):
        ups = dict(zip(apply_role.outputs, apply_role.fn(request)))
        assert all(bool(ups[b]["visible"] is True) is shown for b in hidden), request.username


def _prompt(studio) -> int:
    return int(studio.prompts()["id"].min())


def test_blind_mode_without_logins_makes_every_visitor_an_annotator(studio):
    """Nobody proved to be the owner: the page is the annotator's (and owner-only actions are refused)."""
    from rlhf_studio.studio.app import launch_app
    from rlhf_studio.studio.auth import role_of
    from rlhf_studio.studio.ui.common import blind_view
    from tests.browser import free_port
    demo = launch_app(studio, blind=True, port=free_port(), quiet=True)
    try:
        visitor = gr.Request(username=None)
        assert role_of(studio, visitor) == "annotator" and blind_view(studio, visitor)
    finally:
        demo.close()


def test_blind_evaluate_tab_names_no_policy_to_an_annotator(blind_studio):
    """The Evaluate tab's results name policies and give win rates: an annotator in blind mode gets the held-out
    prompts and the pairs to vote on, nothing else; an owner gets the results."""
    studio, ids = blind_studio
    aid = int(studio.adapters()["id"].iloc[0])
    prompt_id = int(studio.completions()["prompt_id"].iloc[0])
    studio.store.add_evaluation(dict(policy=POLICY, baseline="base", policy_adapter_id=aid, judge="callable:x"),
                                [dict(prompt_id=prompt_id, policy_completion_id=ids[2],
                                      baseline_completion_id=ids[0], policy_first=True, judge_winner="policy")])
    by_id, fns = _app(studio)
    bo, ana = gr.Request(username="bo"), gr.Request(username="ana")
    on_open = _handler(fns, "on_open", by_id["eval-history"]).fn
    refresh = _handler(fns, "on_refresh", by_id["eval-history"]).fn
    for sent in (on_open(request=bo), refresh(request=bo)):
        assert POLICY not in _values(sent) and "win_rate" not in _values(sent)
    assert POLICY in _values(on_open(request=ana)) and "win_rate" in _values(refresh(request=ana))
