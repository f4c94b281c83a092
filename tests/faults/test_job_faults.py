"""Job faults: a PPO run that cannot fit is refused before it starts; one that runs out of memory while training
fails cleanly with advice, the app keeps serving, and the next run works.

Out of memory is made real on this CPU by capping the job's address space (RLHF_STUDIO_JOB_HEADROOM_MB, the
same switch a user of a shared machine sets) and asking for a batch whose full-vocabulary logits alone need
over a gigabyte."""
import pytest

from rlhf_studio import StudioError

pytestmark = pytest.mark.slow

LONG_PROMPTS = [("Summarise the following notes for a busy reader. " + f"Note {i}: the meeting moved to Tuesday. " * 40)
                for i in range(8)]


@pytest.fixture
def with_reward(studio):
    """Prompts in the library and a fast-tier reward model fitted on real rankings."""
    for p in ["Name a fruit.", "Say hello.", "Name a colour."]:
        cs = studio.generate(p, n=3, max_new_tokens=6, seed=0)
        studio.rank([c.id for c in cs])
    assert studio.train_reward_model(tier="fast") is not None
    return studio


def test_a_run_that_cannot_fit_is_refused_before_anything_starts(studio):
    runs_before = len(studio.runs())
    with pytest.raises(StudioError, match=r"needs about [\d.]+ GiB but only [\d.]+ GiB is free.*batch_size"):
        studio.train_ppo(steps=1, batch_size=4096, mini_batch_size=4096, max_new_tokens=8192,
                         max_prompt_tokens=32768)
    assert len(studio.runs()) == runs_before          # no run row, no process
    assert studio.jobs.current is None


@pytest.mark.parametrize("bad", [dict(batch_size=10**7), dict(lr=float("nan")), dict(max_new_tokens=10**6),
                                 dict(ppo_epochs="4"), dict(kl_coef=float("inf"))])
def test_absurd_ppo_settings_are_refused_with_the_field_named(studio, bad):
    name = next(iter(bad))
    with pytest.raises(StudioError, match=f"invalid PPO settings: {name} must"):
        studio.train_ppo(steps=1, **bad)
    assert len(studio.runs()) == 0


def test_out_of_memory_during_ppo_fails_cleanly_and_the_next_run_works(with_reward):
    s = with_reward
    s.jobs.memory_headroom_mb = 300
    run = s.train_ppo(steps=2, wait=True, prompts=LONG_PROMPTS, batch_size=8, mini_batch_size=8,
                      max_prompt_tokens=512, max_new_tokens=4, ppo_epochs=1)
    assert run.status == "failed"
    row = s.store.run(run.run_id)
    assert row["status"] == "failed"
    assert "out of memory" in row["error"] and "lower batch_size" in row["error"], row["error"]
    # the app keeps serving: a generation and a label work, and a run that fits completes
    cs = s.generate("Name a fruit.", n=2, max_new_tokens=4, seed=3)
    assert s.compare(cs[0].id, cs[1].id, "a") > 0
    s.jobs.memory_headroom_mb = None
    again = s.train_ppo(steps=1, wait=True, batch_size=2, mini_batch_size=2, max_new_tokens=4, ppo_epochs=1)
    assert again.status == "completed" and again.adapter_id is not None
