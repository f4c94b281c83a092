"""Training jobs on a Ray cluster (`Studio(cluster=...)`, `rlhf-studio --cluster ADDRESS`).

The app stays the one process that writes the DuckDB file. A job becomes a Ray actor that runs the same
`rlhf_studio.studio.jobs.ppo_worker` as a local job; what the worker sends is queued inside the actor and fetched by the
app through `RayConn`, which offers the worker connection's send/recv/poll/close, so that `JobManager._pump`
writes metrics, checkpoints and adapters exactly as it does for a local job.

With `workers` > 1 the actor only coordinates: it runs a Ray Train `TorchTrainer` of that many workers (gloo on
CPU, nccl on GPU), each running `ppo_worker` on its share of every step's batch with the gradients averaged
across them (components/distributed.py); rank 0 speaks for all, through the actor's queue."""
from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import tempfile
import time

from .errors import StudioError

INSTALL_HINT = "install it with `pip install 'rlhf-studio[cluster]'` (scripts/install.sh does)"
_PARTS = ("studio", "components", "storage")     # rlhf_studio's parts (pyproject.toml maps them into it)
START_TIMEOUT_S = 300      # a worker process plus its imports; on a busy 2-core machine this took over a minute


def _package_home() -> str:
    """The folder that holds the `rlhf_studio` package: a checkout's root, or site-packages."""
    import rlhf_studio
    return os.path.dirname(os.path.dirname(os.path.abspath(rlhf_studio.__file__)))


def package_for_workers() -> str:
    """The rlhf_studio package as one folder, shipped to a remote cluster's workers (Ray's py_modules): an
    installed wheel's as it is; a checkout's assembled in a temporary folder, since its parts are the package's
    siblings there, not its children."""
    package = os.path.join(_package_home(), "rlhf_studio")
    if all(os.path.isdir(os.path.join(package, part)) for part in _PARTS):
        return package
    out = os.path.join(tempfile.mkdtemp(prefix="rlhf-studio-workers-"), "rlhf_studio")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package, out, ignore=skip)
    for part in _PARTS:
        shutil.copytree(os.path.join(_package_home(), part), os.path.join(out, part), ignore=skip)
    return out


def _ray():
    try:
        import ray
    except ImportError:
        raise StudioError(f"the cluster backend needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a 'ray://host:port' or 'host:port' address; None for 'auto' and the like."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() and host else None


def _algorithm_of(config) -> str:
    """The algorithm whose config class `config` is (PPOConfig -> "ppo", DPOConfig -> "dpo", ...)."""
    from rlhf_studio.components.training import ALGORITHMS, config_class
    return next(a for a in ALGORITHMS if type(config) is config_class(a))


class Cluster:
    """A connection to a Ray runtime: 'local' starts one on this machine, anything else is a Ray address
    ('ray://head:10001' for Ray Client, 'head:6379' or 'auto' for a node of the cluster)."""

    def __init__(self, address: str, num_cpus: int | None = None, workers: int = 1):
        if not isinstance(address, str) or not address.strip():
            raise StudioError(f"cluster must be 'local' or a Ray address such as ray://head:10001, got {address!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise StudioError(f"cluster_workers must be a whole number >= 1, got {workers!r}")
        self.workers = workers     # data-parallel workers per training job; may be changed between runs
        self.address = address.strip()
        self.local = self.address == "local"
        ray = _ray()
        self._owns_runtime = False
        if not self.local:
            self._probe()
        if ray.is_initialized():       # this process is already connected (a notebook, a test's shared runtime)
            return
        try:
            ray.init(address=None if self.local else self.address, num_cpus=num_cpus if self.local else None,
                     include_dashboard=False, log_to_driver=True, configure_logging=False,
                     runtime_env=None if self.local else {"py_modules": [package_for_workers()]})
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
            raise StudioError(f"cannot reach the Ray cluster at {self.address}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None
        self._owns_runtime = True

    def _probe(self, timeout: float = 5.0) -> None:
        """Refuse an address nobody listens on within seconds (ray.init itself retries for a minute or more)."""
        hp = _host_port(self.address)
        if hp is None:
            return
        try:
            socket.create_connection(hp, timeout=timeout).close()
        except OSError as e:
            raise StudioError(f"cannot reach the Ray cluster at {self.address}: {e.strerror or e}; start it with "
                              "`ray start --head` there (see docs/CLUSTER.md) or check the address") from None

    def check(self, config=None) -> dict:
        """The cluster's resources; a StudioError when it cannot be reached, has fewer CPUs (or GPUs) than the
        job's workers, or `config`'s global batch does not split over them (called before a run row exists)."""
        ray = _ray()
        try:
            if not ray.is_initialized():
                raise ConnectionError("not connected")
            resources = ray.cluster_resources()
        except Exception as e:  # noqa: BLE001
            raise StudioError(f"cannot reach the Ray cluster at {self.address}: {e}") from None
        if self.workers > 1:
            gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
            if 0 < gpus < self.workers or (not gpus and cpus < self.workers):
                have = f"{gpus:g} GPUs" if gpus else f"{cpus:g} CPUs"
                raise StudioError(f"the Ray cluster at {self.address} has {have}, fewer than the {self.workers} "
                                  "training workers asked for (one each): lower cluster_workers or add nodes")
            if config is not None:
                self.split(_algorithm_of(config), config.to_dict())
        return resources

    def split(self, algorithm: str, config: dict) -> dict:
        """One worker's config of a job on `self.workers` workers; a StudioError where the batch does not split."""
        from rlhf_studio.components.distributed import split_config
        try:
            return split_config(algorithm, config, self.workers)
        except ValueError as e:
            raise StudioError(f"cannot train on {self.workers} workers: {e}") from None

    # ----------------------------------------------------------------------------------------- jobs
    def launch(self, spec: dict, run_id: int):
        """Start the worker as an actor on the cluster; return (conn, process-like) for JobManager._pump."""
        ray = _ray()
        resources, parallel = self.check(), self.workers > 1
        if parallel:       # a resumed run's batch is checked here (a new run's before its row exists)
            self.split(spec.get("algorithm") or "ppo", spec["config"])
        gpus = 1 if resources.get("GPU", 0) >= 1 and not parallel else 0
        spec = dict(spec, device=None if gpus else "cpu")   # the worker's own GPU, not the app's device name
        # data parallel: the actor only coordinates (Ray Train's workers hold the CPUs or GPUs)
        options = dict(num_cpus=0 if parallel else 1, num_gpus=gpus, max_restarts=0, max_concurrency=8, name=None)
        if self.local:     # the local runtime's workers find this checkout's packages through PYTHONPATH
            path = os.pathsep.join(filter(None, [_package_home(), os.environ.get("PYTHONPATH")]))
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        actor = ray.remote(_JobActor).options(**options).remote()
        use_gpu = resources.get("GPU", 0) >= self.workers
        done_ref = actor.run_parallel.remote(spec, self.workers, use_gpu, run_id) if parallel else \
            actor.run.remote(spec)
        return RayConn(actor, run_id), RayJob(actor, done_ref)

    def spawn(self, manager, run_id: int, spec: dict, wait: bool):
        """JobManager._spawn's cluster branch: launch, mark the run running, pump its messages."""
        try:
            conn, job = self.launch(spec, run_id)
        except StudioError as e:
            manager.store.set_run_status(run_id, "failed", error=str(e))
            raise
        return manager.follow(run_id, conn, job, wait, spec.get("algorithm") or "ppo")

    def shutdown(self) -> None:
        if self._owns_runtime:
            try:
                _ray().shutdown()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self._owns_runtime = False


# ------------------------------------------------------------------------- inside the actor (on the cluster)
class _ActorConn:
    """The worker's end inside the actor, shaped like its local connection: send() queues for the app to fetch,
    recv()/poll() read what the app delivered (("cancel",) and any later app-to-worker message)."""

    def __init__(self, outbox: queue.Queue, inbox: queue.Queue):
        self.outbox, self.inbox = outbox, inbox

    def send(self, msg) -> None:
        self.outbox.put(msg)

    def poll(self, timeout: float = 0.0) -> bool:
        if timeout:
            deadline = time.time() + timeout
            while self.inbox.empty() and time.time() < deadline:
                time.sleep(0.05)
        return not self.inbox.empty()

    def recv(self):
        return self.inbox.get()

    def close(self) -> None:
        pass


class _JobActor:
    """Runs one training job; `drain` and `deliver` are served by other threads while `run` trains (or while
    `run_parallel` waits for its Ray Train workers, whose rank 0 calls `put`, `wait_inbox` and `take`)."""

    def __init__(self):
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.ended: str | None = None      # "done" or "error", once one went out
        self.pids: dict[int, int] = {}     # rank -> process id of each data-parallel worker

    def pid(self) -> int:
        return os.getpid()

    def run_parallel(self, spec: dict, workers: int, use_gpu: bool, run_id: int) -> None:
        """The job on `workers` Ray Train workers; a failure none of them reported becomes the run's error."""
        import traceback

        import ray
        try:
            fit_data_parallel(ray.put(spec), workers, use_gpu, ray.get_runtime_context().current_actor, run_id)
        except Exception as e:  # noqa: BLE001 - WorkerGroupError, ControllerError, ...
            message, died = _failure_message(e)
            if not self.ended or (died and self.ended == "error"):   # a death outranks what a survivor said of it
                self.put(("error", message, traceback.format_exc()[-4000:]))
        finally:
            self.outbox.put(None)          # end of stream

    def put(self, msg) -> None:
        self.outbox.put(msg)
        if msg[0] in ("done", "error") and not self.ended:
            self.ended = msg[0]

    def wait_inbox(self, timeout: float) -> bool:
        return _ActorConn(self.outbox, self.inbox).poll(timeout)

    def take(self):
        return self.inbox.get()

    def worker_started(self, rank: int, pid: int) -> None:
        self.pids[rank] = pid

    def worker_pids(self) -> dict[int, int]:
        return dict(self.pids)

    def run(self, spec: dict) -> None:
        from rlhf_studio.studio.jobs import CancelFlag, ppo_worker
        conn = _ActorConn(self.outbox, self.inbox)
        try:
            ppo_worker(conn, CancelFlag(conn), spec)      # the local job's code, unchanged
        finally:
            self.outbox.put(None)          # end of stream

    def deliver(self, msg) -> None:
        self.inbox.put(msg)

    def drain(self, wait_s: float) -> list:
        """The messages queued so far, waiting up to wait_s for the first (a long poll)."""
        out = []
        try:
            out.append(self.outbox.get(timeout=wait_s))
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return out


# ------------------------------------------------------- data parallel: Ray Train workers, in the actor's care
def fit_data_parallel(spec_ref, workers: int, use_gpu: bool, coordinator, run_id: int) -> None:
    """Run the job's `TorchTrainer` (blocks until every worker is done; raises where one failed or died)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    storage = tempfile.mkdtemp(prefix="rlhf-studio-job-")      # Ray Train's own records; the studio keeps none
    try:
        TorchTrainer(_data_parallel_worker, train_loop_config={"spec": spec_ref, "coordinator": coordinator},
                     torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                     scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                     run_config=RunConfig(storage_path=storage, name=f"studio-run{run_id}-{time.time_ns()}",
                                          failure_config=FailureConfig(max_failures=0))).fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def worker_spec(spec: dict, rank: int, world: int, device) -> dict:
    """Worker `rank`'s spec: its share of the global batch; for an online algorithm its share of the prompts
    (all of them where there are fewer prompts than workers); the reward-hacking watch on rank 0 only."""
    from rlhf_studio.components.distributed import split_config
    out = dict(spec, config=split_config(spec.get("algorithm") or "ppo", spec["config"], world), device=str(device),
               watch=spec.get("watch") if rank == 0 else None)
    if spec.get("prompts") and len(spec["prompts"]) >= world:
        out["prompts"] = spec["prompts"][rank::world]
    return out


class _RankConn:
    """A data-parallel worker's connection: rank 0's messages go to the coordinating actor, in order (each send
    waits for it), and it reads the app's (cancel) from there; the other ranks' go nowhere (rank 0 speaks for
    all). `last` is the newest message sent: how the worker ended."""

    def __init__(self, coordinator=None):
        self.coordinator, self.last = coordinator, None

    def send(self, msg) -> None:
        import ray
        if self.coordinator is not None:
            ray.get(self.coordinator.put.remote(msg))
        self.last = msg

    def poll(self, timeout: float = 0.0) -> bool:
        import ray
        return self.coordinator is not None and ray.get(self.coordinator.wait_inbox.remote(timeout))

    def recv(self):
        import ray
        return ray.get(self.coordinator.take.remote())

    def close(self) -> None:
        pass


def _data_parallel_worker(config: dict) -> None:
    """One Ray Train worker: the local job's code (`ppo_worker`) on this worker's share, its trainer made data
    parallel (components.distributed.make_data_parallel), rank 0's cancel shared at the top of every step."""
    import ray
    import ray.train
    import ray.train.torch
    from rlhf_studio.components.distributed import SharedStop, make_data_parallel
    from .jobs import CancelFlag, ppo_worker
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config["coordinator"].worker_started.remote(rank, os.getpid())
    device = ray.train.torch.get_device()
    spec = worker_spec(ray.get(config["spec"]), rank, world, device)
    conn = _RankConn(config["coordinator"] if rank == 0 else None)
    stop = SharedStop(CancelFlag(conn) if rank == 0 else None, device)
    ppo_worker(conn, stop, spec, prepare=lambda trainer: make_data_parallel(trainer, rank, world))
    kind, *rest = conn.last or ("error", "it ended without a word")
    if kind == "error":          # Ray Train then stops the others and the actor reports it (rank 0 already did)
        raise RuntimeError(f"training worker {rank} of {world} failed: {rest[0]}")
    if rank == 0 and rest[0] == "paused" and not stop.stopped:
        stop.announce()          # the watch paused the run after a step: the others ask before their next one


# what gloo or NCCL says in a worker whose peer is gone
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted", re.I)


def _failure_message(e: BaseException) -> tuple[str, bool]:
    """(the run's error, whether a worker died) for a data-parallel job that failed: a worker that died (killed,
    out of memory, its node lost) rather than one that raised and said why (`_data_parallel_worker`), or one
    whose collective broke because a peer was gone."""
    failures = getattr(e, "worker_failures", None)
    if not failures:                   # Ray Train itself (no worker group, a scheduling failure, ...)
        text = " ".join(str(e).split())[:400]
        return f"the training job on the Ray cluster failed: {type(e).__name__}: {text}", False
    said = {r: f for r, f in failures.items() if re.search(r"training worker \d+ of \d+ failed", str(f))}
    gone = sorted(set(failures) - set(said))
    if not gone and not any(_PEER_LOST.search(str(f)) for f in said.values()):
        first = " ".join(str(said[min(said)]).split())
        return "a " + re.search(r"training worker \d+ of \d+ failed: .{0,400}", first).group(0), False
    why = " ".join(str(failures[gone[0]] if gone else e).split())[:300]
    rank = f"rank {gone[0]}: " if gone else ""
    return (f"a training worker on the Ray cluster died before finishing ({rank}killed, out of memory or its node "
            f"lost): {why}; resume the run to continue from its last checkpoint"), True


# ----------------------------------------------------------------------------------- the app's side
class RayConn:
    """The app's end of a cluster job, shaped like the local worker connection (send/recv/poll/close)."""

    def __init__(self, actor, run_id: int, wait_s: float = 1.0):
        self.actor, self.run_id, self.wait_s = actor, run_id, wait_s
        self._inbox: list = []
        self._ended = False

    def send(self, msg) -> None:
        self.actor.deliver.remote(msg)

    def poll(self, timeout: float = 0.0) -> bool:
        if not self._inbox and not self._ended:
            self._fetch(timeout)
        return bool(self._inbox) or self._ended

    def recv(self):
        while not self._inbox:
            if self._ended:
                raise EOFError("the cluster job ended")
            self._fetch(self.wait_s)
        msg = self._inbox.pop(0)
        if msg is None:
            self._ended = True
            raise EOFError("the cluster job ended")
        from .channel import check_message
        from .jobs import JOB_TO_APP
        check_message(msg, JOB_TO_APP)     # the same promise as the local channel: only well-formed messages
        return msg

    def _fetch(self, wait_s: float) -> None:
        import ray
        try:
            self._inbox.extend(ray.get(self.actor.drain.remote(wait_s)))
        except Exception as e:  # noqa: BLE001 - RayActorError, node lost, cluster gone
            reason = " ".join(str(e).split())[:300]
            self._inbox.extend([("error", "the training worker on the Ray cluster died before finishing (killed, "
                                 f"out of memory or its node lost): {type(e).__name__}: {reason}; resume the run "
                                 "to continue from its last checkpoint", ""), None])

    def close(self) -> None:
        self._ended = True


class RayJob:
    """The process-like handle JobManager expects (pid, poll, wait, kill, returncode) for a cluster job."""

    def __init__(self, actor, done_ref):
        self.actor, self.done_ref = actor, done_ref
        self.returncode: int | None = None
        import ray
        try:
            self.pid = ray.get(actor.pid.remote(), timeout=START_TIMEOUT_S)   # the worker's process id on its node
        except ray.exceptions.GetTimeoutError:
            self.kill()
            raise StudioError(f"the Ray cluster did not start the training worker within {START_TIMEOUT_S} s: "
                              "it has no free CPU (or GPU) for it; free some or add a node") from None
        except Exception:  # noqa: BLE001 - it died at once: the pump reports it
            self.pid = None

    def worker_pids(self) -> dict[int, int]:
        """rank -> process id of each data-parallel worker started so far (empty for a one-worker job)."""
        import ray
        return ray.get(self.actor.worker_pids.remote())

    def poll(self) -> int | None:
        import ray
        if self.returncode is None and ray.wait([self.done_ref], timeout=0)[0]:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        import ray
        t0 = time.time()
        ready, _ = ray.wait([self.done_ref], timeout=timeout)
        if not ready:
            raise TimeoutError(f"the cluster job did not end within {time.time() - t0:.0f} s")
        self._finish()
        return self.returncode

    def _finish(self) -> None:
        import ray
        try:
            ray.get(self.done_ref)
            self.returncode = 0
        except Exception:  # noqa: BLE001 - the actor died
            self.returncode = 1
        self.kill()

    def kill(self) -> None:
        import ray
        try:
            ray.kill(self.actor)      # frees its CPU/GPU on the cluster
        except Exception:  # noqa: BLE001
            pass
        if self.returncode is None:
            self.returncode = -9
