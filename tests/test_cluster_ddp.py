"""The studio's own training jobs in data parallel on a Ray cluster (`Studio(cluster=..., cluster_workers=N)`),
with a real local Ray runtime (CPU, gloo) and a tiny random-weight Llama (tests/tiny_models.py) that every worker
loads from its folder: DPO on 2 workers takes the same steps as 1 worker with the same global batch, and cancels
and resumes; an RLOO run on 2 workers streams, fails with a clear message when a worker is killed, resumes and
generates; the setting is refused where it cannot work, before any run row exists. One Ray runtime serves the
whole file."""
import os
import signal
import time

import pytest

from rlhf_studio import StudioError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

DPO = dict(batch_size=4, grad_accum=2, lr=0.02, max_completion_tokens=8, lora_r=4, lora_alpha=8, max_grad_norm=1.0)
RLOO = dict(prompts_per_step=2, k=2, mini_batch_size=4, max_new_tokens=4, lora_r=4, lora_alpha=8, lr=0.01,
            checkpoint_every=1)


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_studio(ray_runtime, tmp_path_factory, lm):
    """A Studio on the tiny Llama, jobs on the local Ray runtime, with 4 labelled pairs and a fast reward model."""
    from rlhf_studio import Studio
    from tests.tiny_models import write_tiny_model
    root = tmp_path_factory.mktemp("ddp")
    folder = write_tiny_model("llama", root / "tiny-llama", lm.source_path)
    s = Studio(str(root / "s.duckdb"), model=str(folder), device="cpu", dtype="fp32", cluster="local",
               cluster_workers=2)
    s.reward.settings.deep_every = 0
    for p in ["Name a fruit.", "Say hello.", "Name a colour.", "Tell a joke."]:
        cs = s.generate(p, n=3, max_new_tokens=5, seed=0)
        s.rank([c.id for c in cs])
    assert s.train_reward_model(tier="fast") is not None
    try:
        yield s
    finally:
        s.close()


def _one_worker(s, run_id: int):
    """The run's two steps in this process, by the code a job runs (studio.jobs.trainer_from_spec) on a fresh
    load of the model: one worker, the whole global batch. Returns (losses, adapter tensors)."""
    from rlhf_studio.components.models import load_model
    from rlhf_studio.studio.jobs import trainer_from_spec
    config = dict(s.store.run(run_id)["config"])
    spec = {"algorithm": config.pop("algorithm"), "rows": config.pop("rows"), "config": config}
    cfg, trainer = trainer_from_spec(load_model(s.model_id, device="cpu", dtype="fp32"), spec)
    losses = [trainer.step()["loss"] for _ in range(cfg.steps)]
    return losses, {k: v.clone() for k, v in trainer._adapter_state().items()}


def _adapter(s, adapter_id, tmp_path) -> dict:
    from safetensors.torch import load_file
    from rlhf_studio.components.adapters import unpack_adapter
    path = unpack_adapter(s.store.adapter(adapter_id)["weights"], tmp_path / f"a{adapter_id}")
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_dpo_on_two_workers_takes_the_steps_of_one_and_cancels(tiny_studio, tmp_path):
    """Two DPO steps of a global batch of 4 pairs on 2 workers (2 pairs each, in micro-batches of 1; gradients
    averaged before the clip) give the losses and adapter weights of the same two steps on one worker with the
    whole batch (in micro-batches of 2: grad_accum=2 on both). The
    2-worker run is first cancelled (the cancel is sent before its first step, so it lands there: both workers
    stop) and resumed from that checkpoint, which must not change a thing."""
    s = tiny_studio
    run = s.train("dpo", steps=2, wait=False, **DPO)
    run.cancel()
    assert run.wait(timeout=300) == "cancelled", run.error
    assert run.metrics().empty and s.store.latest_checkpoint(run.run_id)[0] == 0
    two = s.resume_ppo(run.run_id, wait=True)
    assert two.status == "completed", two.error
    m2 = two.metrics().set_index("step")
    assert list(m2.index) == [1, 2] and m2.loc[1, "pairs_per_s"] > 0
    losses, a1 = _one_worker(s, run.run_id)
    a2 = _adapter(s, two.adapter_id, tmp_path)
    assert set(a1) == set(a2) and a1
    diff = max((a1[k] - a2[k]).abs().max().item() for k in a1)
    moved = max(a1[k].abs().max().item() for k in a1 if "lora_B" in k)      # B starts at zero
    loss_diff = max(abs(losses[i] - m2.loc[i + 1, "loss"]) for i in (0, 1))
    print(f"DPO losses 1 worker {losses}, 2 workers {m2['loss'].tolist()}; adapter max |diff| {diff:.2e} "
          f"(LoRA B moved by {moved:.2e}); loss max |diff| {loss_diff:.2e}")
    assert moved > 1e-3 and losses[1] != losses[0]        # the steps did something
    assert diff < 1e-5 and loss_diff < 1e-5


def test_refused_before_any_run_row(tiny_studio, tmp_path, lm):
    from rlhf_studio import Studio
    s = tiny_studio
    runs = len(s.runs())
    with pytest.raises(StudioError, match=r"batch_size \(3\) must be a multiple of the 2 workers"):
        s.train("dpo", steps=1, **dict(DPO, batch_size=3, grad_accum=1))
    s.cluster.workers = 4
    try:
        with pytest.raises(StudioError, match="has 3 CPUs, fewer than the 4 training workers"):
            s.train("dpo", steps=1, **DPO)
    finally:
        s.cluster.workers = 2
    assert len(s.runs()) == runs
    with pytest.raises(StudioError, match="cluster_workers=2 needs a Ray cluster"):
        Studio(str(tmp_path / "x.duckdb"), model=lm, cluster_workers=2)


def test_rloo_on_two_workers_streams_fails_on_a_killed_worker_resumes_and_generates(tiny_studio):
    """One run through the promises (each start costs a Ray Train worker group and a model load per worker):
    live metrics averaged by rank 0; SIGKILL of worker 1 fails the run with a clear message; resumed, it
    completes from its checkpoint and its adapter generates in the app."""
    s = tiny_studio
    # enough steps that the kill below lands while the workers still train (a tiny model's step is milliseconds:
    # with 2 steps the run could complete between its first metrics and the kill)
    steps = 20
    run = s.train("rloo", steps=steps, wait=False, **RLOO)
    t0 = time.time()
    while run.metrics().empty and run.running() and time.time() - t0 < 300:
        time.sleep(0.3)
    assert len(run.metrics()) >= 1, run.error            # live metrics
    pids = run._process.worker_pids()
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    os.kill(pids[1], signal.SIGKILL)
    assert run.wait(timeout=180) == "failed"
    assert "worker on the Ray cluster died" in s.store.run(run.run_id)["error"]
    assert s.generate("Say hello.", n=1, max_new_tokens=3, seed=0)      # the app keeps serving

    last = s.resume_ppo(run.run_id, wait=True)
    assert last.status == "completed", last.error
    m = last.metrics()
    assert m["step"].tolist()[-1] == steps and m["step"].tolist() == sorted(set(m["step"]))
    assert {"reward_mean", "policy_loss", "samples_per_s"} <= set(m.columns)
    assert not last.samples().empty                      # rank 0's sample rollouts
    outs = s.generate("Name a fruit.", n=1, max_new_tokens=4, seed=0, adapter=last.adapter_id)
    assert outs and outs[0].adapter is not None
