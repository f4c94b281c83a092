"""The services stand on what they are given (a store, a model provider, callbacks), not on a Studio:
Studio._wire_services builds them that way, and so can a test or another front end."""
import pytest

from rlhf_studio.studio.errors import StudioError
from rlhf_studio.studio.jobs import JobManager
from rlhf_studio.studio.reward_service import RewardService, RewardSettings

TEXTS = ["Rain taps the window.", "Grey clouds drift by.", "Puddles everywhere.", "The sun is out.", "Snow."]


def test_reward_service_and_job_manager_without_a_studio(fresh_store, lm):
    reward = RewardService(fresh_store, lambda: lm, RewardSettings(deep_every=0))
    jobs = JobManager(fresh_store, lambda: lm, reward_snapshot=reward.snapshot, watch_spec=lambda run, cfg: None)
    assert reward.revision == lm.revision and jobs.lm is lm

    # nothing labelled yet: both refuse in the user's words, before any run row exists
    with pytest.raises(StudioError, match="no reward model yet"):
        reward.snapshot()
    fresh_store.add_prompts(["Write about rain"])
    with pytest.raises(StudioError, match="no deep reward model yet"):
        jobs.start_ppo(steps=1, reward_tier="deep")
    with pytest.raises(StudioError, match="no labels for DPO"):
        jobs.start_training("dpo", steps=1)
    assert fresh_store.runs().empty

    # a ranking of five completions: ten pairs, the fast tier fits on the real model's features
    _, ids = fresh_store.add_generation("Write about rain", [{"text": t} for t in TEXTS])
    fresh_store.add_feedback(kind="ranking", ranking=ids, annotator="t", session_id="s")
    reward.labels_changed()
    assert reward.last_error is None and reward.fast_version is not None
    assert reward.texts(ids[:2]) == (["Write about rain"] * 2, TEXTS[:2])
    assert not reward.has_deep() and not reward.deep_training()
    tier, version = reward.snapshot()        # what a job would score with: the fast tier, weights stored
    assert tier == "fast" and fresh_store.reward_version(version)["weights"] is not None
    s = reward.visible_scores(ids)
    assert all(x is not None for x in s) and s[0][0] > s[-1][0]     # ranked first scores above ranked last
