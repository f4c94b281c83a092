"""Training on a Ray cluster, with a real local Ray runtime (CPU, gloo): data parallelism is equivalent to one
worker, a studio run on the cluster streams, cancels, resumes and generates, a killed worker fails the run with
a clear message, and an unreachable cluster is refused before any run row exists. One Ray runtime serves the
whole file (starting one costs seconds)."""
import os
import shutil
import signal
import time

import pytest

from rlhf_studio import StudioError
from tests.studios import open_studio

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TINY = dict(batch_size=2, mini_batch_size=2, max_new_tokens=6, ppo_epochs=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_unreachable_cluster_is_refused_before_any_run(tmp_path, lm, capsys):
    from rlhf_studio.storage import Store
    db = str(tmp_path / "s.duckdb")
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(StudioError, match="cannot reach the Ray cluster at"):
            from rlhf_studio import Studio
            Studio(db, model=lm, cluster=address)
    from rlhf_studio.studio.cli import main
    assert main(["--db", db, "--cluster", "127.0.0.1:1", "--no-browser"]) == 2     # refused before the model loads
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in capsys.readouterr().err
    st = Store(db)
    try:
        assert st.runs().empty
    finally:
        st.close()


def test_two_workers_take_the_same_step_as_one(ray_runtime):
    """One SGD step of the tiny LoRA model on 2 DDP workers (2 rows each) equals one step on the whole batch of
    4 in one process: same loss, same updated LoRA weights."""
    import torch
    from rlhf_studio.components.distributed import (fixed_batch, lora_state, tiny_llama, train_data_parallel, train_steps,
                                        with_lora)
    model = with_lora(tiny_llama(0))
    before = lora_state(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    one_loss = train_steps(model, opt, fixed_batch(4, 16), steps=1)
    one = lora_state(model)
    two = train_data_parallel(2, batch=4, seq_len=16, steps=1, lr=0.5)
    assert set(two["lora"]) == set(one) and len(one) == 8
    moved = max((one[k] - before[k]).abs().max().item() for k in one)
    diff = max((one[k] - two["lora"][k]).abs().max().item() for k in one)
    print(f"loss 1 worker {one_loss[0]:.7f}, 2 workers {two['losses'][0]:.7f}; LoRA max |diff| {diff:.2e}, "
          f"moved {moved:.2e}")
    assert moved > 1e-3                          # the step changed the weights: equality is not trivial
    assert diff < 1e-6 and abs(one_loss[0] - two["losses"][0]) < 1e-5


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory, lm):
    path = str(tmp_path_factory.mktemp("cluster") / "trained.duckdb")
    with open_studio(path, lm) as s:
        for p in ["Name a fruit.", "Say hello.", "Name a colour.", "Tell a joke."]:
            s.rank([c.id for c in s.generate(p, n=3, max_new_tokens=6, seed=0)])
        assert s.train_reward_model(tier="fast") is not None
    return path


@pytest.fixture
def on_cluster(ray_runtime, trained_db, tmp_path, lm):
    from rlhf_studio import Studio
    db = str(tmp_path / "studio.duckdb")
    shutil.copy(trained_db, db)
    s = Studio(db, model=lm, cluster="local")      # joins the file's runtime
    s.reward.settings.deep_every = 0
    try:
        yield s
    finally:
        s.close()


def _wait_for(cond, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_cluster_run_streams_cancels_resumes_survives_a_killed_worker_and_generates(on_cluster):
    """One run through every promise (each job start on the cluster costs a fresh worker process and a model
    load, so they share one run): live metrics, cancel, resume, SIGKILL of the worker, resume, generate."""
    from rlhf_studio.studio.cluster import RayJob
    s = on_cluster
    run = s.train_ppo(steps=4, wait=False, **TINY)
    assert isinstance(run._process, RayJob)              # it runs on the cluster, not as a local process
    _wait_for(lambda: len(run.metrics()) >= 1)            # live curves: metrics arrive while it trains
    run.cancel()
    assert run.wait(timeout=300) == "cancelled"
    done = int(run.metrics()["step"].max())
    assert 1 <= done < 3 and s.store.latest_checkpoint(run.run_id)[0] == done

    again = s.resume_ppo(run.run_id, wait=False)
    _wait_for(lambda: s.store.latest_checkpoint(run.run_id)[0] > done or not again.running())
    os.kill(again.pid, signal.SIGKILL)                    # the actor's process on this (local) node
    assert again.wait(timeout=120) == "failed"
    assert "worker on the Ray cluster died" in s.store.run(run.run_id)["error"]
    assert s.generate("Say hello.", n=1, max_new_tokens=4, seed=0)      # the app keeps serving

    last = s.resume_ppo(run.run_id, wait=True)            # goes on from the newest checkpoint
    assert last.status == "completed", last.error
    steps = last.metrics()["step"].tolist()
    assert steps[-1] == 4 and steps == sorted(set(steps))
    outs = s.generate("Name a fruit.", n=1, max_new_tokens=5, seed=0, adapter=last.adapter_id)
    assert outs and outs[0].adapter is not None
