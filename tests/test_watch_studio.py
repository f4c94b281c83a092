"""The reward-hacking watch in the studio: a real PPO job checks its probes, streams every check to the app, and a
"pause" verdict stops it at a step boundary with a checkpoint (status `paused`, resumable); the app keeps the best
policy for a roll back and offers a blind audit whose votes are labels like any other. Storage of checks too."""
from __future__ import annotations

import pytest

from rlhf_studio import StudioError

pytestmark = pytest.mark.slow

TINY = dict(batch_size=2, mini_batch_size=2, max_new_tokens=6, ppo_epochs=1, lr=5e-3)
# thresholds so loose that the first check where the training reward rose at all while anything else got worse
# pauses: this test is about what a pause does, not about when the rule fires (tests/test_watch*.py)
HAIR_TRIGGER = dict(every=1, probes=4, window=1, min_reward_rise=1e-6, judge_drop=1e-6, diversity_ratio=0.999,
                    no_eos_jump=0.001, min_judge_pairs=2)


def test_store_keeps_checks_the_best_adapter_and_the_pause(fresh_store):
    st = fresh_store
    rid = st.create_run("ppo", {}, {})
    st.set_run_status(rid, "running")
    st.add_watch_check(rid, 0, "ok", "ok", {"reward": 0.0, "judge": 0.0}, best=True, adapter=b"step0")
    st.add_watch_check(rid, 5, "ok", "ok", {"reward": 1.0, "judge": 0.5}, best=True, adapter=b"step5")
    st.add_watch_check(rid, 10, "pause", "why", {"reward": 2.0, "judge": -0.5}, {"reward_likes": [{"x": 1}]})
    df = st.watch_checks(rid)
    assert df["step"].tolist() == [0, 5, 10] and df["has_adapter"].tolist() == [False, True, False]
    assert df["judge"].tolist() == [0.0, 0.5, -0.5] and df["examples"].iloc[2] == {"reward_likes": [{"x": 1}]}
    assert st.watch_best_adapter(rid) == (5, b"step5")        # only the best check keeps its policy
    assert st.run_pause(rid) is None
    st.pause_run(rid)
    assert st.run(rid)["status"] == "cancelled" and st.run_pause(rid)["reason"] == "why"
    assert st.paused_run_ids() == [rid]
    st.set_run_status(rid, "running")                          # a resume ends the pause
    assert st.run_pause(rid) is None and st.paused_run_ids() == []
    with pytest.raises(Exception, match="verdict"):
        st.add_watch_check(rid, 11, "maybe", None, {})


def test_paused_run_keeps_checkpoint_rolls_back_audits_and_resumes(studio):
    s = studio
    for p in ["Name a fruit.", "Say hello.", "Name a colour.", "Describe the sea.", "Tell a joke.",
              "Name a tree."]:
        cs = s.generate(p, n=3, max_new_tokens=6, seed=0)
        s.rank([c.id for c in cs])
    assert s.train_reward_model(tier="fast") is not None
    with pytest.raises(StudioError, match="unknown watch settings"):
        s.train_ppo(steps=2, watch={"evry": 1}, **TINY)
    run = s.train_ppo(steps=5, wait=True, seed=1, watch=HAIR_TRIGGER, **TINY)
    checks = s.watch_checks(run.run_id)
    assert run.status == "paused", (run.error, s.runs()[["status", "error"]].to_dict("records"))
    paused_at = int(checks["step"].iloc[-1])
    print("paused at", paused_at, checks["reason"].iloc[-1])
    assert 1 <= paused_at < 5 and checks["verdict"].iloc[-1] == "pause"
    assert checks["step"].tolist() == list(range(paused_at + 1))       # the baseline, then every step
    for col in ("reward", "kl", "length", "length_corr", "distinct_1", "distinct_2", "no_eos"):
        assert checks[col].notna().all(), col
    why = s.watch_pause(run.run_id)
    assert why["reason"].startswith("training reward rose") and why["examples"]["reward_likes"]
    assert s.store.latest_checkpoint(run.run_id)[0] == paused_at       # stopped at the step boundary, saved
    assert s.runs().set_index("id").loc[run.run_id, "status"] == "paused"

    best = s.rollback(run.run_id)
    assert int(checks.loc[checks["has_adapter"], "step"].iloc[0]) == s.store.adapter(best)["step"]
    assert s.generate("Say hello.", n=1, max_new_tokens=4, adapter=best)[0].text is not None
    pairs = s.watch_audit(run.run_id, n=2, max_new_tokens=4)
    assert len(pairs) == 2 and {"a", "b", "a_text", "b_text", "prompt"} <= set(pairs[0])
    n_before = len(s.feedback())
    s.compare(pairs[0]["a"], pairs[0]["b"], "a")                      # the audit vote is a label like any other
    assert len(s.feedback()) == n_before + 1

    again = s.resume_ppo(run.run_id, wait=True)
    assert again.status in ("completed", "paused")
    steps = again.metrics()["step"].tolist()
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > paused_at      # went on, nothing repeated


def test_no_watch_when_off_too_short_or_from_before_the_watch(studio):
    from rlhf_studio.studio.watch import job_spec, probe_prompts
    rid = studio.store.create_run("ppo", {}, {})
    base = {"steps": 10, "watch_probes": ["p"]}
    assert job_spec(studio, rid, {**base, "watch": {"enabled": False}}) is None
    assert job_spec(studio, rid, {**base, "watch": {"every": 11}}) is None       # not one check interval long
    assert job_spec(studio, rid, {"steps": 10}) is None                        # a run started before the watch
    spec = job_spec(studio, rid, {**base, "watch": {"every": 5}})              # no labels: no second judge
    assert spec["probes"] == ["p"] and spec["judge"] is None
    assert "without a second judge" in studio.store.run(rid)["notes"]
    # probes: prompts the run does not train on where there are enough, else training prompts with a note
    assert probe_prompts(["a", "b", "c", "d"], ["a", "b"], 2) == (sorted(["c", "d"], key=_h), None)
    probes, note = probe_prompts(["a", "b", "c"], ["a", "b"], 2)
    assert sorted(probes) == ["a", "b"] and "training prompts" in note


def _h(p):
    import hashlib
    return hashlib.sha256(p.encode()).hexdigest()


def test_train_tab_shows_a_pause_with_its_examples_and_buttons(studio):
    import gradio as gr
    from rlhf_studio.studio.ui import train, watch_panel
    s = studio
    rid = s.store.create_run("ppo", {"steps": 4}, {})
    s.store.set_run_status(rid, "running")
    ex = {"reward_likes": [{"prompt": "p", "response": "of of of", "reward": 9.0, "judge": -1.0}],
          "judge_dislikes": [{"prompt": "p", "response": "of of of", "reward": 9.0, "judge": -1.0}]}
    s.store.add_watch_check(rid, 0, "ok", "ok", {"reward": 0.0, "judge": 0.0, "kl": 0.0, "no_eos": 0.0})
    s.store.add_watch_check(rid, 2, "pause", "training reward rose 3.00 sd ..., but diversity collapsed",
                            {"reward": 3.0, "judge": -1.0, "kl": 2.0, "no_eos": 1.0}, ex)
    md, checks, table, vis = watch_panel.watch_status(s, rid)
    assert md.startswith("Watch: 2 checks") and len(checks) == 2 and not vis["visible"]   # running: no pause
    s.store.pause_run(rid)
    assert s.runs().set_index("id").loc[rid, "status"] == "paused"
    md, checks, table, vis = watch_panel.watch_status(s, rid)
    assert "Paused by the reward-hacking watch at step 2" in md and "diversity collapsed" in md and vis["visible"]
    assert table["which"].tolist() == ["reward model likes most", "second judge likes least"]
    fig = watch_panel.checks_figure(checks)
    assert {t.name for t in fig.data} >= {"training reward", "second judge", "KL"}
    assert "with a kept policy to roll back to" in watch_panel.on_rollback(s, rid)   # nothing kept: said clearly
    assert "start a blind audit first" in watch_panel.on_audit_vote(s, None, "a")[0]
    assert "stopped" in watch_panel.on_stop(s, rid) and s.watch_pause(rid) is None
    assert s.store.run(rid)["status"] == "cancelled"
    with gr.Blocks() as demo:
        train.build(s)                     # the panel is wired into the tab, and its timer shows the tab's run
    tick = next(f for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "refresh"
                and any(getattr(o, "elem_id", None) == "watch-status" for o in f.outputs))
    assert tick.fn(None)[0].startswith("Watch: 2 checks")


def test_watch_buttons_refuse_an_annotator_on_the_server(studio):
    import gradio as gr
    from rlhf_studio.studio.auth import Account, Accounts
    from rlhf_studio.studio.ui import train
    studio.accounts = Accounts({"ana": Account("ana", "pw-owner", "owner"), "bo": Account("bo", "pw-bo")})
    with gr.Blocks() as demo:
        train.build(studio)
    actions = [f for f in demo.fns.values() if not f.inputs and any(
        getattr(o, "elem_id", None) == "watch-msg" for o in f.outputs)]
    assert len(actions) == 4                       # resume, roll back, stop, audit

    class Req:
        username = "bo"
    for f in actions:
        out = f.fn(Req())
        assert "your role (annotator) may not" in (out[0] if isinstance(out, tuple) else out), f.fn
