"""Training jobs on a Ray cluster (`Studio(cluster=...)`, `rlhf-studio --cluster ADDRESS`).

The app stays the one process that writes the DuckDB file. A job becomes a Ray actor that runs the same
`studio.jobs.ppo_worker` as a local job; what the worker sends is queued inside the actor and fetched by the
app through `RayConn`, which offers the worker connection's send/recv/poll/close, so that `JobManager._pump`
writes metrics, checkpoints and adapters exactly as it does for a local job."""
from __future__ import annotations

import os
import queue
import socket
import time

from .errors import StudioError

INSTALL_HINT = "install it with `pip install 'rlhf-studio[cluster]'` (scripts/install.sh does)"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGES = ("studio", "components", "storage")   # shipped to remote workers with the job
START_TIMEOUT_S = 300      # a worker process plus its imports; on a busy 2-core machine this took over a minute


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


class Cluster:
    """A connection to a Ray runtime: 'local' starts one on this machine, anything else is a Ray address
    ('ray://head:10001' for Ray Client, 'head:6379' or 'auto' for a node of the cluster)."""

    def __init__(self, address: str, num_cpus: int | None = None):
        if not isinstance(address, str) or not address.strip():
            raise StudioError(f"cluster must be 'local' or a Ray address such as ray://head:10001, got {address!r}")
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
                     runtime_env=None if self.local else {"py_modules": [os.path.join(_ROOT, p) for p in _PACKAGES]})
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

    def check(self) -> dict:
        """The cluster's resources; a StudioError when it cannot be reached (called before a run row exists)."""
        ray = _ray()
        try:
            if not ray.is_initialized():
                raise ConnectionError("not connected")
            return ray.cluster_resources()
        except StudioError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StudioError(f"cannot reach the Ray cluster at {self.address}: {e}") from None

    # ----------------------------------------------------------------------------------------- jobs
    def launch(self, spec: dict, run_id: int):
        """Start the worker as an actor on the cluster; return (conn, process-like) for JobManager._pump."""
        ray = _ray()
        gpus = 1 if self.check().get("GPU", 0) >= 1 else 0
        spec = dict(spec, device=None if gpus else "cpu")   # the worker's own GPU, not the app's device name
        options = dict(num_cpus=1, num_gpus=gpus, max_restarts=0, max_concurrency=4, name=None)
        if self.local:     # the local runtime's workers find this checkout's packages through PYTHONPATH
            path = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        actor = ray.remote(_JobActor).options(**options).remote()
        done_ref = actor.run.remote(spec)
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
    """Runs one training job; `drain` and `deliver` are served by other threads while `run` trains."""

    def __init__(self):
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: dict) -> None:
        from studio.jobs import _CancelFlag, ppo_worker
        conn = _ActorConn(self.outbox, self.inbox)
        try:
            ppo_worker(conn, _CancelFlag(conn), spec)      # the local job's code, unchanged
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
