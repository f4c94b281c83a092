"""s.train(algorithm=...) from the Studio: the same job process, run handle, lineage and adapters as PPO."""
import pytest

from rlhf_studio import StudioError

pytestmark = pytest.mark.slow

OFFLINE_TINY = dict(batch_size=2, max_completion_tokens=8, lora_r=4, lora_alpha=8, checkpoint_every=1)


@pytest.fixture
def labelled(studio):
    """Two prompts, two completions each, one pairwise choice and two thumbs per prompt."""
    for p in ["Name a fruit.", "Say hello."]:
        a, b = studio.generate(p, n=2, max_new_tokens=4, seed=0)
        studio.compare(a.id, b.id, winner="a")
        studio.thumbs(a.id, up=True)
        studio.thumbs(b.id, up=False)
    return studio


def test_dpo_run_from_the_studio(labelled):
    s = labelled
    run = s.train("dpo", steps=2, wait=True, lr=1e-3, **OFFLINE_TINY)
    assert run.status == "completed", run.error
    m = run.metrics()
    assert list(m["step"]) == [1, 2]
    for k in ("loss", "reward_margin", "logp_chosen", "logp_rejected", "pairs_per_s"):
        assert k in m.columns
    row = s.runs().set_index("id").loc[run.run_id]
    assert row["config"]["algorithm"] == "dpo" and row["config"]["beta"] == 0.1
    lineage = row["lineage"]
    assert lineage["algorithm"] == "dpo" and lineage["pairs"] == len(row["config"]["rows"]) >= 1
    assert lineage["feedback_ids"] and lineage["criterion"] == "overall"
    assert run.adapter_id is not None
    assert s.adapters().set_index("id").loc[run.adapter_id]["name"].startswith("dpo-run")
    assert s.generate("Say hello.", n=1, max_new_tokens=4, seed=0, adapter=run.adapter_id)[0].text
    with pytest.raises(StudioError, match="already completed"):
        s.resume_ppo(run.run_id)


def test_refusals_name_the_setting(studio):
    s = studio
    with pytest.raises(StudioError, match="unknown algorithm 'sft'"):
        s.train("sft")
    with pytest.raises(StudioError, match="unknown DPO settings: kl_coef"):
        s.train("dpo", kl_coef=0.1)
    with pytest.raises(StudioError, match="invalid KTO settings: beta must be a finite number"):
        s.train("kto", beta="high")
    with pytest.raises(StudioError, match="invalid DPO settings: loss_type"):
        s.train("dpo", loss_type="hinge")
    with pytest.raises(StudioError, match="needs good/bad labels"):
        s.train("kto")                                     # nothing labelled yet
    with pytest.raises(StudioError, match="needs preference pairs"):
        s.train("dpo")


def test_an_online_run_is_watched_and_an_offline_one_refuses_a_watch(labelled):
    """RLOO and GRPO train against a reward model as PPO does, so the reward-hacking watch guards them too."""
    s = labelled
    assert s.train_reward_model(tier="fast") is not None
    with pytest.raises(StudioError, match="guards runs against a reward model"):
        s.train("dpo", watch={"every": 1}, **OFFLINE_TINY)
    run = s.train("rloo", steps=2, wait=True, watch={"every": 1, "probes": 2, "max_new_tokens": 4},
                  prompts_per_step=2, k=2, mini_batch_size=4, max_new_tokens=4, lora_r=4, lora_alpha=8)
    assert run.status == "completed", run.error
    checks = s.watch_checks(run.run_id)
    assert checks["step"].tolist() == [0, 1, 2]                 # the baseline, then every step
    for col in ("reward", "kl", "length", "distinct_2", "no_eos"):
        assert checks[col].notna().all(), col
    assert s.runs().set_index("id").loc[run.run_id]["config"]["watch"]["every"] == 1
