"""Held-out evaluation (issue 22): the interval math on hand-computed numbers, held-out prompts kept out of PPO's
snapshot, evaluate() with a callable, reward and human judge on the real embedded model, starter prompts."""
import math

import pytest

from rlhf_studio import StudioError
from rlhf_studio.studio.evaluation import hash_heldout, training_prompts, wilson_interval

PROMPTS = ["Name a fruit.", "Say hello."]
TOKENS = 6


# ------------------------------------------------------------------------------------------------ math
@pytest.mark.parametrize("successes, n, low, high", [
    (7, 10, 0.3968, 0.8922),       # by hand: p=.7, z=1.96: centre .6445, half-width .2477
    (0, 5, 0.0, 0.4345),           # z^2/n / (1 + z^2/n) = .7683 / 1.7683
    (4, 6, 0.3000, 0.9032),        # 3 wins and 2 ties of 6: p = (3 + 2/2) / 6
    (5, 10, 0.2366, 0.7634),       # symmetric around one half
])
def test_wilson_interval_on_hand_computed_numbers(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_of_nothing_is_unknown():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_hash_split_holds_out_about_a_fifth_and_is_stable():
    texts = [f"prompt number {i}" for i in range(2000)]
    share = sum(map(hash_heldout, texts)) / len(texts)
    assert 0.17 < share < 0.23
    assert [hash_heldout(t) for t in texts[:50]] == [hash_heldout(t) for t in texts[:50]]


# ------------------------------------------------------------------------------------------------ held out
def test_heldout_prompts_are_left_out_of_the_ppo_snapshot(studio):
    assert studio.load_starter_prompts() == 25
    assert studio.load_starter_prompts() == 0                # idempotent: nothing added twice
    lib = list(studio.prompts()["text"])
    assert studio.hold_out([lib[0]]) in (0, 1) and studio.hold_out([lib[0]]) == 0
    held = set(studio.heldout_prompts()["text"])
    assert lib[0] in held and {t for t in lib if hash_heldout(t)} <= held and len(held) < len(lib)
    snap, note = studio.jobs._prompt_snapshot()
    assert note is None and set(snap) == set(lib) - held


def test_every_prompt_held_out_falls_back_with_a_note(fresh_store):
    fresh_store.add_prompts(["only prompt"])
    fresh_store.mark_prompts_heldout(list(fresh_store.prompts()["id"]))
    snap, note = training_prompts(fresh_store)
    assert snap == ["only prompt"] and "held out" in note


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.fixture(scope="module")
def adapter_blob():
    """A real LoRA adapter for the embedded model with random (non-zero) weights: a policy that differs."""
    import tempfile
    import torch
    from peft import LoraConfig, get_peft_model
    from rlhf_studio.components.adapters import pack_adapter_dir
    from rlhf_studio.components.models import load_model
    torch.manual_seed(0)
    model = get_peft_model(load_model("embedded", device="cpu", dtype="fp32").model,
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return pack_adapter_dir(d)


def _adapter(studio, blob) -> int:
    return studio.store.add_adapter("random-lora", blob, {}, studio.model_id, studio.lm.revision)


def _longer(prompt, first, second):
    return "tie" if len(first) == len(second) else ("a" if len(first) > len(second) else "b")


def test_base_against_base_is_a_coin(studio):
    calls = []

    def longer(prompt, first, second):
        calls.append(prompt)
        return _longer(prompt, first, second)

    r = studio.evaluate("base", "base", prompts=PROMPTS, judge=longer, max_new_tokens=TOKENS, seed=3)
    pairs = studio.evaluation_pairs(r["id"])
    assert (pairs["policy_text"] == pairs["baseline_text"]).all()        # same seeds on both sides
    assert calls == PROMPTS and r["judge"] == "callable:longer" and (r["judged"], r["ties"]) == (2, 2)
    assert r["win_rate"] == 0.5 and (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(1, 2))
    assert r["policy_tokens"] == r["baseline_tokens"] > 0
    assert set(studio.heldout_prompts()["text"]) >= set(PROMPTS)          # evaluated prompts stay held out
    assert studio.evaluations()["id"].tolist() == [r["id"]]


def test_a_length_judge_on_a_different_policy(studio, adapter_blob):
    """The judge sees the sides in a random order per pair; its verdicts come back mapped to the policy."""
    aid = _adapter(studio, adapter_blob)
    r = studio.evaluate(f"adapter-{aid}", prompts=PROMPTS, judge=_longer, max_new_tokens=TOKENS)
    pairs = studio.evaluation_pairs(r["id"])
    assert (pairs["policy_text"] != pairs["baseline_text"]).any()
    expected = ["tie" if len(a) == len(b) else ("policy" if len(a) > len(b) else "baseline")
                for a, b in zip(pairs["policy_text"], pairs["baseline_text"])]
    assert list(pairs["judge_winner"]) == expected
    assert r["win_rate"] == pytest.approx((expected.count("policy") + expected.count("tie") / 2) / 2)
    assert r["policy"] == f"adapter-{aid}" and r["baseline"] == "base"
    assert r["policy_chars"] == pytest.approx(pairs["policy_text"].str.len().mean())


def _reward_model(studio):
    for p in ("Name an animal.", "Say goodbye."):
        cs = studio.generate(p, n=3, max_new_tokens=6, seed=0)
        studio.rank([c.id for c in cs])


def test_reward_judge_and_human_votes_with_agreement(studio, adapter_blob):
    with pytest.raises(StudioError, match="no reward model yet"):
        studio.evaluate("base", prompts=PROMPTS, judge="reward", max_new_tokens=TOKENS)
    _reward_model(studio)
    aid = _adapter(studio, adapter_blob)
    r = studio.evaluate(aid, prompts=PROMPTS[:1], judge="reward", max_new_tokens=TOKENS)
    pairs = studio.evaluation_pairs(r["id"])
    for c, reward in zip(pairs["policy_completion_id"], pairs["policy_reward"]):
        assert studio.score(int(c))[0] == pytest.approx(reward)
    wins = int((pairs["policy_reward"] > pairs["baseline_reward"]).sum())
    assert r["wins"] == wins and r["reward_version"] is not None

    h = studio.evaluate(aid, prompts=PROMPTS, judge="human", max_new_tokens=TOKENS, criterion="overall")
    assert h["judged"] == 0 and h["pending"] == 2 and math.isnan(h["win_rate"])
    hp = studio.evaluation_pairs(h["id"]).set_index("idx")
    votes = []
    while (nxt := studio.next_evaluation_pair("ann")) is not None:
        assert nxt["evaluation_id"] == h["id"] and "policy" not in str(nxt)   # no identities
        row = hp.loc[nxt["idx"]]
        left_is_policy = nxt["left_id"] == row["policy_completion_id"]
        assert left_is_policy == row["policy_first"]
        winner = "a" if left_is_policy else "b"          # this annotator always prefers the policy
        studio.compare(nxt["left_id"], nxt["right_id"], winner, annotator="ann")
        votes.append(nxt["idx"])
    assert sorted(votes) == [0, 1]
    done = studio.evaluation(h["id"])
    assert (done["judged"], done["wins"], done["pending"], done["win_rate"]) == (2, 2, 0, 1.0)
    decisive = hp[hp["policy_reward"] != hp["baseline_reward"]]
    assert done["agreement_n"] == len(decisive) >= 1
    assert done["agreement"] == pytest.approx((decisive["policy_reward"] > decisive["baseline_reward"]).mean())
    other = studio.next_evaluation_pair("bo")              # another annotator still has the pairs to judge
    studio.compare(other["left_id"], other["right_id"], "tie", annotator="bo")
    assert studio.evaluation(h["id"])["judged"] == 3


def test_bad_arguments_are_refused_clearly(studio):
    with pytest.raises(StudioError, match="judge must be"):
        studio.evaluate("base", prompts=PROMPTS, judge="crowd")
    with pytest.raises(StudioError, match="no criterion"):
        studio.evaluate("base", prompts=PROMPTS, judge="human", criterion="nope")
    studio.add_criterion("brevity", "Is it short?")
    with pytest.raises(StudioError, match="the reward model judges by 'overall', not 'brevity'"):
        studio.evaluate("base", prompts=PROMPTS, judge="reward", criterion="brevity")
    with pytest.raises(StudioError, match="no held-out prompts"):
        studio.evaluate("base", judge="human")
    with pytest.raises(StudioError, match="unknown adapter|no adapter"):
        studio.evaluate("adapter-99", prompts=PROMPTS, judge="human")
    with pytest.raises(StudioError, match="must return 'a'"):
        studio.evaluate("base", prompts=PROMPTS[:1], judge=lambda p, a, b: "left", max_new_tokens=4)


def test_start_ppo_trains_on_the_prompts_not_held_out(studio):
    """PPO's prompts come from the snapshot without held-out ones (the job's process is not started here: its
    spawn is replaced to catch what it would be handed)."""
    _reward_model(studio)
    studio.load_starter_prompts()
    studio.hold_out(["Name an animal."])
    handed = []
    studio.jobs._spawn = lambda run_id, cfg, prompts, *a, **k: handed.append((run_id, prompts))
    studio.train_ppo(steps=1)
    run_id, prompts = handed[-1]
    held = set(studio.heldout_prompts()["text"])
    assert set(prompts) == set(studio.prompts()["text"]) - held and "Name an animal." not in prompts
    assert studio.store.run(run_id)["config"]["prompts"] == prompts and not studio.store.run(run_id)["notes"]
    studio.hold_out(list(studio.prompts()["id"]))
    studio.train_ppo(steps=1)
    run_id, prompts = handed[-1]
    assert set(prompts) == set(studio.prompts()["text"]) and "held out" in studio.store.run(run_id)["notes"]


# ------------------------------------------------------------------------------------------------ the tab
def _fn(demo, name):
    return next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == name)


def test_evaluate_tab_handlers_and_roles(studio):
    import gradio as gr
    from rlhf_studio.studio.app import build_app
    from rlhf_studio.studio.auth import Account, Accounts
    from rlhf_studio.studio.ui import evaluate as tab
    demo = build_app(studio, max_queue=None)
    studio.accounts = Accounts({"ana": Account("ana", "pw-ana-123", "owner"),
                                "bo": Account("bo", "pw-bo-456", "annotator")})
    ana, bo = gr.Request(username="ana"), gr.Request(username="bo")
    # a fresh library offers the starter prompts to its owner only
    page_load = _fn(demo, "page_load")
    assert page_load(ana)[2]["visible"] is True and page_load(bo)[2]["visible"] is False
    assert "may not add prompts" in _fn(demo, "on_starter")(bo)[0] and len(studio.prompts()) == 0
    _fn(demo, "on_starter")(ana)
    assert len(studio.prompts()) == 25 and page_load(ana)[2]["visible"] is False

    assert "may not hold out" in tab.mark_heldout(studio, PROMPTS[0], bo)[0]
    assert "may not run evaluations" in tab.run_evaluation(studio, "base", "base", "human", "overall", 1, 6, 0,
                                                           bo)[0]
    assert len(studio.evaluations()) == 0
    assert "Max new tokens" in tab.run_evaluation(studio, "base", "base", "human", "overall", 1, 0, 0, ana)[0]
    out = tab.run_evaluation(studio, "base", "base", "human", "overall", 2, 6, 0, ana)
    assert "2 pairs queued" in out[0] and "No verdicts yet" in out[1] and len(out[2]) == 1
    shown = tab.next_pair(studio, bo)
    assert shown[1] and shown[3]["evaluation_id"] == 1
    after = tab.vote(studio, shown[3], "tie", bo)
    assert "vote saved" in after[4] and after[3]["idx"] != shown[3]["idx"]
    last = tab.vote(studio, after[3], "tie", bo)
    assert last[3] is None and "no pairs waiting" in last[4]
    r = studio.evaluation(1)
    assert (r["judged"], r["ties"]) == (2, 2) and "win rate of base: **50%**" in tab.latest_result(studio)
    hist, per_crit, heldout = tab.tables(studio)
    assert list(per_crit["criterion"]) == ["overall"] and per_crit["win_rate"].iloc[0] == 0.5
    assert len(heldout) == len(studio.heldout_prompts()) >= 2


def test_evaluate_endpoints_on_a_real_server(studio):
    """The tab's events through a running Gradio server (inputs and outputs as the browser sends them)."""
    from gradio_client import Client
    app = studio.launch(open_browser=False)
    client = Client(app.local_url, verbose=False)
    assert "25 starter prompts added" in client.predict(api_name="/load_starter_prompts")
    status, result, history, per_crit, heldout = client.predict("base", "base", "human", "overall", 1, 6, 0,
                                                                api_name="/evaluate")
    assert "1 pairs queued" in status and "No verdicts yet" in result and len(heldout["data"]) >= 4
    shown = client.predict(api_name="/evaluation_next_pair")
    assert shown[1] and shown[2]                                   # the left and right texts
    last = client.predict(api_name="/evaluation_vote_a")
    assert "vote saved" in last[-1] and "no pairs waiting" in last[-1]
    r = studio.evaluation(1)
    assert (r["judged"], r["pending"]) == (1, 0) and r["wins"] + r["losses"] == 1


def test_default_prompts_leave_out_what_the_policys_run_trained_on(fresh_store):
    """A run given explicit prompts may have trained on a held-out one: its policy is not evaluated on it."""
    from rlhf_studio.studio.evaluation import _eval_prompts
    fresh_store.add_prompts(["first held", "second held", "kept for training"])
    fresh_store.mark_prompts_heldout(list(fresh_store.prompts()["id"])[:2])
    run = fresh_store.create_run("ppo", {"prompts": ["second held"]})
    aid = fresh_store.add_adapter("a", b"w", {}, "m", run_id=run)
    assert _eval_prompts(fresh_store, None, aid, None) == (["first held"], False)
    assert _eval_prompts(fresh_store, None, None, None) == (["first held", "second held"], False)
