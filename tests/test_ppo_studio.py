"""PPO from the Studio: a background process, one job at a time, cancel, kill -9 and resume from the newest
complete checkpoint, adapters stored in the DuckDB file, exported for PEFT, generated with."""
import os
import shutil
import signal
import time

import pytest

from rlhf_studio import StudioError
from tests.studios import open_studio

pytestmark = pytest.mark.slow

TINY = dict(batch_size=2, mini_batch_size=2, max_new_tokens=6, ppo_epochs=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory, lm):
    """A closed DuckDB file with prompts and a fast-tier reward model fitted on real rankings (made once)."""
    path = str(tmp_path_factory.mktemp("ppo") / "trained.duckdb")
    with open_studio(path, lm) as s:
        for p in ["Name a fruit.", "Say hello.", "Name a colour.", "Describe the sea.", "Tell a joke."]:
            cs = s.generate(p, n=3, max_new_tokens=6, seed=0)
            s.rank([c.id for c in cs])
        assert s.train_reward_model(tier="fast") is not None
    return path


@pytest.fixture
def trained(trained_db, tmp_path, lm):
    """A studio on this test's own copy of trained_db."""
    db = str(tmp_path / "studio.duckdb")
    shutil.copy(trained_db, db)
    with open_studio(db, lm) as s:
        assert not s.reward_versions().empty
        yield s


def _wait_for(cond, timeout=600, every=0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(every)
    raise AssertionError("timed out")


def test_cancel_then_resume_to_completion(trained):
    s = trained
    run = s.train_ppo(steps=4, wait=False, **TINY)
    with pytest.raises(StudioError, match="already running"):
        s.train_ppo(steps=2, **TINY)                      # one training job at a time
    _wait_for(lambda: len(run.metrics()) >= 1)
    run.cancel()
    assert run.wait(timeout=600) == "cancelled"
    done = int(run.metrics()["step"].max())
    assert 1 <= done < 4
    assert s.store.latest_checkpoint(run.run_id)[0] == done  # saved at the boundary where it stopped
    assert run.adapter_id is not None                         # the partial policy is usable too
    again = s.resume_ppo(run.run_id, wait=True)
    assert again.status == "completed"
    m = again.metrics()
    assert m["step"].tolist() == list(range(1, 5))            # continued, no step repeated or lost
    for col in ("reward_mean", "reward_std", "kl", "entropy", "policy_loss", "value_loss", "clip_frac",
                "response_len"):
        assert col in m.columns and m[col].notna().all(), col
    lineage = s.store.run(run.run_id)["lineage"]
    assert lineage["reward_tier"] == "fast" and lineage["base_revision"] == s.lm.revision


def test_kill9_marks_interrupted_and_resumes_from_last_checkpoint(trained):
    s = trained
    run = s.train_ppo(steps=5, wait=False, **TINY)
    _wait_for(lambda: (s.store.latest_checkpoint(run.run_id) or (0,))[0] >= 2)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(timeout=120) == "interrupted"
    ck_step = s.store.latest_checkpoint(run.run_id)[0]
    assert "exited unexpectedly" in (s.store.run(run.run_id)["error"] or "")
    resumed = s.resume_ppo(run.run_id, wait=True)
    assert resumed.status == "completed"
    steps = resumed.metrics()["step"].tolist()
    assert steps[-1] == 5 and ck_step >= 2
    assert steps == sorted(set(steps))


def test_adapter_exports_for_peft_and_generates(trained, tmp_path, monkeypatch):
    """Also: compile="on" where inductor has no working C++ compiler (a real failure in the job's own process: a
    compiler that always fails, an empty compile cache). The run trains eagerly and its notes say why, in the
    DuckDB file the Train tab reads."""
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    s = trained
    run = s.train_ppo(steps=1, wait=True, compile="on", **TINY)
    assert run.status == "completed" and run.adapter_id
    assert run.metrics()["compiled"].tolist() == [0.0]
    notes = s.store.run(run.run_id)["notes"]
    assert notes is not None and len(notes.splitlines()) == 1, notes
    assert "compiled training passes failed" in notes and "C++ compiler" in notes, notes
    assert s.runs().set_index("id").loc[run.run_id, "notes"] == notes and run.notes == [notes]
    out = s.generate("Name a fruit.", n=2, max_new_tokens=5, adapter=run.adapter_id, seed=0)
    assert len(out) == 2
    comp = s.completions()
    assert set(comp[comp["id"].isin([c.id for c in out])]["adapter_id"]) == {run.adapter_id}
    path = s.export_adapter(run.adapter_id, str(tmp_path / "adapter"))
    from peft import PeftModel
    from rlhf_studio.components.models import load_model
    base = load_model("embedded", dtype="fp32")
    model = PeftModel.from_pretrained(base.model, path)
    ids = base.tokenizer("Hello", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=base.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    with pytest.raises(StudioError, match="not empty"):
        s.export_adapter(run.adapter_id, path)


def test_bad_settings_and_missing_reward(studio):
    with pytest.raises(StudioError, match="unknown PPO settings"):
        studio.train_ppo(steps=2, warp_speed=True)
    with pytest.raises(StudioError):
        studio.train_ppo(steps=2, batch_size=0)
    studio.add_prompts(["Say hi."])
    with pytest.raises(StudioError, match="no reward model yet"):
        studio.train_ppo(steps=2, **TINY)
