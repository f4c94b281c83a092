"""Background training jobs. PPO runs in a separate process (the DuckDB file stays with the app process):
it gets a snapshot of what it needs (config, prompts, reward-model weights, checkpoint) and streams metrics,
checkpoints and the final adapter back over an inherited socket (studio/channel.py: data frames, never
pickles, each message checked against the kinds below); the app writes them. One training job at a time."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from . import channel as ch
from .errors import StudioError, is_out_of_memory

if TYPE_CHECKING:
    from rlhf_studio.components.models import LoadedModel

log = logging.getLogger("rlhf_studio.jobs")

# What each side accepts (studio/channel.py: the type or check of each item after the kind; `...` = optional after).
# Bytes are safetensors blobs (checkpoints, reward weights) or the adapter zip (checked by components.adapters).
JOB_TO_APP = {
    "started": (ch.step,),
    "metrics": (ch.numbers_by_name, ch.records({"prompt": ch.short_text, "response": ch.short_text,
                                                "reward": ch.number})),
    "note": (ch.short_text,),
    "checkpoint": (ch.step, bytes),
    "adapter": (bytes, ch.step),
    "watch": (lambda v: isinstance(v, dict) and ch.step(v.get("step")) and v.get("verdict") in ("ok", "pause")
              and isinstance(v.get("signals"), dict) and isinstance(v.get("adapter"), (bytes, type(None))),),
    "done": (lambda v: v in ("completed", "cancelled", "paused"),),
    "error": (ch.short_text, ..., ch.short_text),
}
APP_TO_JOB = {"spec": (dict,), "cancel": ()}


# ------------------------------------------------------------------------ the worker process
class CancelFlag:
    """The job's side of a cancel: the app asks for one by sending ("cancel",) on the duplex connection."""

    def __init__(self, conn):
        self.conn, self._set = conn, False

    def is_set(self) -> bool:
        try:
            while not self._set and self.conn.poll():
                if self.conn.recv()[0] == "cancel":
                    self._set = True
        except (EOFError, OSError, ch.ChannelError):
            self._set = True        # the app is gone (or speaks nonsense): stop and save
        return self._set




def worker_main(argv: list[str]) -> None:
    """`python -m rlhf_studio.studio.jobs --channel-fd N`: receive the spec on the inherited channel, train."""
    conn = ch.inherited(argv, APP_TO_JOB)
    msg = conn.recv()
    if msg[0] != "spec":
        raise SystemExit(f"the studio sent {msg[0]!r} before the job's spec")
    ppo_worker(conn, CancelFlag(conn), msg[1])


def ppo_worker(conn, cancel, spec: dict, prepare=None) -> None:
    """Entry point of the training process. Messages sent: ("started",), ("metrics", dict, samples),
    ("note", text), ("watch", check dict), ("checkpoint", step, bytes), ("adapter", bytes, step), ("done", status),
    ("error", message). A "pause" verdict of the reward-hacking watch (studio/watch.py) ends with status "paused".
    `prepare(trainer)`, where given, readies the built trainer before the first step (a data-parallel worker on a
    Ray cluster: studio/cluster.py)."""
    try:
        import torch
        from rlhf_studio.components.models import load_model

        torch.set_num_threads(max(1, int(spec.get("threads") or os.cpu_count() or 1)))
        lm = load_model(spec["model_id"], device=spec.get("device"), dtype=spec.get("dtype"),
                        quantization=spec.get("quantization"))
        cfg, trainer = trainer_from_spec(lm, spec)
        if spec.get("checkpoint"):
            trainer.load_state_bytes(spec["checkpoint"])
        if prepare is not None:
            prepare(trainer)
        if spec.get("memory_headroom_mb"):
            cap_address_space(int(spec["memory_headroom_mb"]))
        conn.send(("started", trainer.step_count))
        status, noted = "completed", set()
        from .watch import JobWatch
        watch = JobWatch(spec["watch"]) if spec.get("watch") else None
        if watch:
            conn.send(("watch", watch.check(trainer)))     # the baseline
        while trainer.step_count < cfg.steps:
            if cancel.is_set():
                status = "cancelled"
                break
            m = trainer.step()
            for note in trainer.notes:
                if note not in noted:
                    conn.send(("note", note))
                    noted.add(note)
            samples = m.pop("samples", [])
            conn.send(("metrics", {k: float(v) if not isinstance(v, int) else v for k, v in m.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}, samples))
            if watch and watch.due(trainer.step_count):
                check = watch.check(trainer)
                conn.send(("watch", check))
                if check["verdict"] == "pause" and trainer.step_count < cfg.steps:   # else it is done anyway
                    status = "paused"
                    break
            if cfg.checkpoint_every and trainer.step_count % cfg.checkpoint_every == 0 \
                    and trainer.step_count < cfg.steps:
                conn.send(("checkpoint", trainer.step_count, trainer.state_bytes()))
        conn.send(("checkpoint", trainer.step_count, trainer.state_bytes()))
        conn.send(("adapter", adapter_zip(trainer), trainer.step_count))
        conn.send(("done", status))
    except Exception as e:  # report, then exit: the app marks the run failed and keeps serving
        import traceback
        traceback.print_exc()          # the worker's stderr is the app's: the full trace lands in its log
        msg = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        if is_out_of_memory(e):
            msg = f"out of memory ({msg}): {OOM_ADVICE}"
        try:
            conn.send(("error", msg, traceback.format_exc()[-4000:]))
        except Exception:
            pass
    finally:
        try:
            conn.close()
        except Exception:
            pass


def trainer_from_spec(lm, spec: dict):
    """(config, trainer) of the spec's algorithm ("ppo" when absent): offline ones (DPO, KTO) train on the
    labelled rows it carries, online ones on its prompts against its reward-model snapshot."""
    from rlhf_studio.components.training import OFFLINE, build_trainer, config_class
    algorithm = spec.get("algorithm") or "ppo"
    cfg = config_class(algorithm).from_dict(spec["config"])
    if algorithm in OFFLINE:
        return cfg, build_trainer(lm, algorithm, cfg, rows=spec["rows"])
    reward_fn = reward_fn_from_bytes(lm, spec["reward_tier"], spec["reward_weights"])
    return cfg, build_trainer(lm, algorithm, cfg, prompts=spec["prompts"], reward_fn=reward_fn)


OOM_ADVICE = ("lower batch_size or mini_batch_size (or raise grad_accum), lower max_new_tokens, turn on "
              "gradient_checkpointing, load the base in 4-bit on a GPU, or use a smaller model")


def cap_address_space(headroom_mb: int) -> None:
    """Let the job grow by at most `headroom_mb` beyond what it holds now (model loaded, trainer built): past
    that, allocations fail inside the job with a MemoryError it reports, instead of the system's OOM killer
    taking the process, or the app, down with no message."""
    import resource
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom_mb * 2**20, hard))


def reward_fn_from_bytes(lm, tier: str, weights: bytes):
    """Rebuild the reward model version that the app snapshotted, as a PPO reward function."""
    from rlhf_studio.components.reward.ppo_reward import reward_fn_for_ppo
    if tier == "fast":
        from rlhf_studio.components.reward.fast import FastRewardModel
        return reward_fn_for_ppo(FastRewardModel.from_bytes(weights), lm)
    from rlhf_studio.components.reward.deep import DeepRewardModel
    return reward_fn_for_ppo(DeepRewardModel.from_bytes(lm, weights), lm)


def adapter_zip(trainer) -> bytes:
    import tempfile
    from rlhf_studio.components.adapters import pack_adapter_dir
    with tempfile.TemporaryDirectory() as d:
        trainer.save_adapter(d)
        return pack_adapter_dir(d)


class _RemoteCancel:
    def __init__(self, conn):
        self.conn = conn

    def set(self) -> None:
        try:
            self.conn.send(("cancel",))
        except (OSError, EOFError):
            pass


# ---------------------------------------------------------------------------- the app side
@dataclass
class RunHandle:
    """A training run (PPO or another algorithm): `.wait()`, `.cancel()`, `.metrics()`, `.adapter_id`, `.status`,
    `.notes`."""
    run_id: int
    _manager: "JobManager"
    _thread: threading.Thread | None = None
    _process: object = None          # subprocess.Popen of the worker
    _cancel: object = None
    adapter_id: int | None = None
    error: str | None = None
    algorithm: str = "ppo"

    @property
    def status(self) -> str:
        """The run's status; "paused" while a pause by the reward-hacking watch is its newest change."""
        store = self._manager.store
        return "paused" if store.run_pause(self.run_id) else store.run(self.run_id)["status"]

    @property
    def notes(self) -> list[str]:
        """What the run did otherwise than its config asked, and why (e.g. trained eagerly: compiling failed)."""
        return (self._manager.store.run(self.run_id)["notes"] or "").splitlines()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def wait(self, timeout: float | None = None) -> str:
        if self._thread:
            self._thread.join(timeout)
        return self.status

    def cancel(self) -> None:
        """Stop at the next step boundary; the worker saves a checkpoint and the adapter first."""
        if self._cancel is not None:
            self._cancel.set()

    def metrics(self):
        return self._manager.store.run_metrics(self.run_id)

    def samples(self):
        return self._manager.store.run_samples(self.run_id)

    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id}, status={self.status!r}, adapter_id={self.adapter_id})"


def memory_headroom_from_env() -> int | None:
    """RLHF_STUDIO_JOB_HEADROOM_MB: an optional cap (MB) on how much a training job may grow after start-up."""
    headroom = os.environ.get("RLHF_STUDIO_JOB_HEADROOM_MB")
    return int(headroom) if headroom else None


class JobManager:
    """The training jobs of one store, one at a time. What it needs comes in explicitly: `model` returns the
    loaded LM now; `reward_snapshot(tier)` -> (tier, version) picks the reward-model version a job scores with
    (RewardService.snapshot); `watch_spec(run_id, run_config)` the watch's part of a job's spec
    (studio.watch.job_spec); `cluster` a Ray cluster (studio/cluster.py) or None for a local process;
    `memory_headroom_mb` caps a job's growth (see cap_address_space)."""

    def __init__(self, store, model: Callable[[], "LoadedModel"], *, reward_snapshot: Callable[[str | None], tuple],
                 watch_spec: Callable[[int, dict], dict | None], cluster=None, memory_headroom_mb: int | None = None):
        self.store = store
        self._model = model
        self._reward_version = reward_snapshot
        self._watch_spec = watch_spec
        self.cluster = cluster
        self.memory_headroom_mb = memory_headroom_mb
        self.current: RunHandle | None = None
        self._lock = threading.Lock()
        self._loaded_adapters: dict[int, str] = {}

    @property
    def lm(self) -> "LoadedModel":
        return self._model()

    def busy(self) -> bool:
        return bool(self.current and self.current.running())

    # ------------------------------------------------------------- launching
    def start_ppo(self, steps: int = 20, wait: bool = False, prompts: list[str] | None = None,
                  reward_tier: str | None = None, reward_version: int | None = None, watch=None,
                  **config) -> RunHandle:
        from .watch import parse_config
        watch_cfg = parse_config(watch)
        cfg = self.config_of("ppo", steps, config)
        self.check_memory(cfg)
        prompts, note = (prompts, None) if prompts else self._prompt_snapshot()
        if not prompts:
            raise StudioError("no prompts to train on: add prompts to the library first")
        tier, version = self._reward_snapshot(reward_tier, reward_version)
        lineage = {"base_model": self.lm.model_id, "base_revision": self.lm.revision,
                   "reward_tier": tier, "reward_version": version,
                   "feedback_labels": int(self.store.stats().get("feedback", 0)), "prompts": len(prompts)}
        config = {**cfg.to_dict(), "prompts": prompts, **self._watch_settings(watch_cfg, prompts)}
        return self._launch(config, lineage, note, cfg=cfg, prompts=prompts, tier=tier, version=version, wait=wait)

    def _watch_settings(self, watch_cfg, prompts: list[str]) -> dict:
        """What a run against a reward model stores for the reward-hacking watch: its settings and its probe
        prompts (held out from `prompts`), with a note where they fell short."""
        from .watch import probe_prompts
        library = [str(t) for t in self.store.prompts()["text"]]
        probes, probe_note = probe_prompts(library, prompts, watch_cfg.probes)
        return {"watch": watch_cfg.to_dict(), "watch_probes": probes, "watch_notes": [probe_note] if probe_note else []}

    def start_training(self, algorithm: str = "ppo", steps: int = 20, wait: bool = False,
                       prompts: list[str] | None = None, reward_tier: str | None = None,
                       reward_version: int | None = None, criterion: str = "overall", watch=None,
                       **config) -> RunHandle:
        """A run of any algorithm of components.training, in the same job process as PPO. Offline ones (DPO,
        KTO) train on a snapshot of the compiled labels of `criterion` (DPO: the preference pairs outside the
        held-out split; KTO: the unpaired good/bad rows); online ones (RLOO, GRPO) like PPO, on the prompts
        against a reward-model snapshot, guarded by the reward-hacking watch as PPO is (`watch`: as
        `start_ppo`'s). Stored as a run of kind 'ppo' (a policy-training run) whose config names the algorithm."""
        from rlhf_studio.components.training import ALGORITHMS, OFFLINE
        if algorithm not in ALGORITHMS:
            raise StudioError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if algorithm == "ppo":
            return self.start_ppo(steps=steps, wait=wait, prompts=prompts, reward_tier=reward_tier,
                                  reward_version=reward_version, watch=watch, **config)
        from .watch import parse_config
        if algorithm in OFFLINE and watch not in (None, False):
            raise StudioError(f"the reward-hacking watch guards runs against a reward model (PPO, RLOO, GRPO); "
                              f"{algorithm.upper()} learns from the labels themselves: leave watch unset")
        watch_cfg = parse_config(watch)
        cfg = self.config_of(algorithm, steps, config)
        self.check_memory(cfg.engine_config())
        lineage = {"algorithm": algorithm, "base_model": self.lm.model_id,
                   "base_revision": self.lm.revision,
                   "feedback_labels": int(self.store.stats().get("feedback", 0))}
        if algorithm in OFFLINE:
            rows, labels = self._label_snapshot(algorithm, criterion)
            tier, version = None, None
            lineage.update(labels, **self._latest_reward())
            data, note = {"rows": rows}, None
        else:
            prompts, note = (prompts, None) if prompts else self._prompt_snapshot()
            if not prompts:
                raise StudioError("no prompts to train on: add prompts to the library first")
            tier, version = self._reward_snapshot(reward_tier, reward_version)
            lineage.update(reward_tier=tier, reward_version=version, prompts=len(prompts))
            data = {"prompts": prompts, **self._watch_settings(watch_cfg, prompts)}
        return self._launch({**cfg.to_dict(), "algorithm": algorithm, **data}, lineage, note, cfg=cfg,
                            prompts=data.get("prompts"), tier=tier, version=version, wait=wait, algorithm=algorithm,
                            rows=data.get("rows"))

    def _launch(self, config: dict, lineage: dict, note: str | None, **spawn) -> RunHandle:
        """Create a policy-training run's row and start its job (one at a time); `spawn`: _spawn's arguments."""
        if self.cluster is not None:
            self.cluster.check(spawn["cfg"])  # unreachable, or a batch its workers cannot split: refused before
                                              # the run row exists
        with self._lock:
            if self.busy():
                raise StudioError(f"a training job is already running (run {self.current.run_id}); "
                                  "cancel it or wait for it to finish")
            run_id = self.store.create_run("ppo", config, lineage)
            if note:
                self.store.add_run_note(run_id, note)
            return self._spawn(run_id, checkpoint=None, **spawn)

    @staticmethod
    def config_of(algorithm: str, steps, settings: dict):
        """The algorithm's config from user settings; unknown or bad settings -> StudioError."""
        from rlhf_studio.components.training import config_class
        cls = config_class(algorithm)
        name = algorithm.upper()
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise StudioError(f"unknown {name} settings: {', '.join(unknown)}")
        try:
            return cls(steps=int(steps), **settings)
        except (TypeError, ValueError) as e:
            raise StudioError(f"invalid {name} settings: {e}") from None

    def _label_snapshot(self, algorithm: str, criterion: str) -> tuple[list[dict], dict]:
        """(rows, lineage) of the labels an offline run trains on: which labels (their feedback ids) and how many."""
        from rlhf_studio.storage import InvalidInput
        from rlhf_studio.storage.io.export import preference_sql, unpaired_sql
        try:
            if algorithm == "dpo":
                df = self.store.query(*preference_sql(self.store, criterion, split="train"))
                split = "train"
                if df.empty:        # a handful of pairs may all fall in the held-out split: use them all
                    df, split = self.store.query(*preference_sql(self.store, criterion)), "all"
                rows = [{"prompt": p, "chosen": c, "rejected": r}
                        for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])]
                what = {"pairs": len(rows), "pair_split": split}
            else:
                df = self.store.query(*unpaired_sql(self.store, criterion))
                rows = [{"prompt": p, "completion": c, "label": bool(y)}
                        for p, c, y in zip(df["prompt"], df["completion"], df["label"])]
                what = {"unpaired_rows": len(rows), "desirable": int(df["label"].sum()) if len(df) else 0}
        except InvalidInput as e:
            raise StudioError(str(e)) from None
        if not rows:
            need = ("preference pairs: compare, rank or star completions of a prompt" if algorithm == "dpo" else
                    "good/bad labels: thumbs up/down, or stars (4-5 good, 1-2 bad)")
            raise StudioError(f"no labels for {algorithm.upper()} on criterion {criterion!r}: it needs {need}")
        ids = sorted({int(i) for i in df["feedback_id"]})
        return rows, {"criterion": criterion, **what, "feedback_ids": ids}

    def _latest_reward(self) -> dict:
        """The newest reward-model version when an offline run starts (for lineage; the run does not use it)."""
        v = self.store.reward_versions()
        if v.empty:
            return {"reward_tier": None, "reward_version": None}
        return {"reward_tier": str(v["tier"].iloc[-1]), "reward_version": int(v["id"].iloc[-1])}

    def resume_ppo(self, run_id: int, wait: bool = False) -> RunHandle:
        from rlhf_studio.components.training.ppo_config import PPOConfig
        run = self.store.run(int(run_id))
        if run["kind"] != "ppo":
            raise StudioError(f"run {run_id} is a {run['kind']} run, not a PPO run; only PPO runs resume here")
        if run["status"] in ("running", "queued") and self.busy() and self.current.run_id == run_id:
            raise StudioError(f"run {run_id} is still running")
        if run["status"] == "completed":
            raise StudioError(f"run {run_id} already completed; start a new run to train further")
        from rlhf_studio.components.training import config_class
        cfg_d = {k: v for k, v in run["config"].items() if not k.startswith("watch")}
        algorithm = cfg_d.pop("algorithm", "ppo")          # runs stored before other algorithms: PPO
        prompts, rows = cfg_d.pop("prompts", None), cfg_d.pop("rows", None)
        cfg = PPOConfig.from_dict(cfg_d) if algorithm == "ppo" else config_class(algorithm).from_dict(cfg_d)
        lineage = run["lineage"]
        ck = self.store.latest_checkpoint(int(run_id))
        with self._lock:
            if self.busy():
                raise StudioError(f"a training job is already running (run {self.current.run_id})")
            return self._spawn(int(run_id), cfg, prompts, lineage.get("reward_tier"), lineage.get("reward_version"),
                               checkpoint=ck[1] if ck else None, wait=wait, algorithm=algorithm, rows=rows)

    def memory_estimate(self, cfg) -> dict:
        """Estimated peak memory of a PPO run with `cfg` on the loaded model's device, and what is free there."""
        from rlhf_studio.components.training.memory import estimate_memory
        lm = self.lm
        return estimate_memory(lm.model.config, cfg, lm.quantization, lm.dtype, device=lm.device.type)

    def check_memory(self, cfg) -> dict:
        """Refuse, before anything starts, a run whose estimated peak memory exceeds what the device has free."""
        est = self.memory_estimate(cfg)
        avail = est.get("available_bytes")
        if avail and est["bytes"] > avail:
            raise StudioError(f"this run needs about {est['gib']:.1f} GiB but only {avail / 2**30:.1f} GiB is free "
                              f"on {est['device']}: {OOM_ADVICE}")
        return est

    def _prompt_snapshot(self) -> tuple[list[str], str | None]:
        """The library's prompts less the held-out ones (studio/evaluation.py), and a note where it fell back."""
        from .evaluation import training_prompts
        return training_prompts(self.store)

    def _reward_snapshot(self, tier: str | None, version: int | None) -> tuple[str, int]:
        if version is None:
            tier, version = self._reward_version(tier)
        v = self.store.reward_version(int(version))
        if v.get("weights") is None:
            raise StudioError(f"reward-model version {version} has no stored weights; train one with "
                              "s.train_reward_model()")
        return v["tier"], int(version)

    worker_module = "rlhf_studio.studio.jobs"      # what _spawn runs (a test swaps in a hostile job)

    def _spawn(self, run_id, cfg, prompts, tier, version, checkpoint, wait, algorithm: str = "ppo",
               rows: list | None = None) -> RunHandle:
        """Start `python -m rlhf_studio.studio.jobs` and hand it the snapshot over an inherited socketpair
        (a fresh interpreter: no fork of the app's threads, and it works from notebooks and stdin scripts)."""
        lm = self.lm
        spec = dict(model_id=lm.model_id, device=str(lm.device), dtype=str(lm.dtype).replace("torch.", ""),
                    quantization=lm.quantization, config=cfg.to_dict(), prompts=prompts, reward_tier=tier,
                    reward_weights=self.store.reward_version(version)["weights"] if prompts is not None else None,
                    algorithm=algorithm, rows=rows, checkpoint=checkpoint,
                    threads=os.environ.get("RLHF_STUDIO_TRAIN_THREADS"),
                    memory_headroom_mb=self.memory_headroom_mb,
                    watch=self._watch_spec(run_id, self.store.run(run_id)["config"]))
        if self.cluster is not None:   # a Ray actor instead of a local process
            return self.cluster.spawn(self, run_id, spec, wait)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        proc, conn = ch.spawn(self.worker_module, JOB_TO_APP, env=env, cwd=root)
        try:
            conn.sock.settimeout(300)      # the job reads its spec once its imports are done
            conn.send(("spec", spec))
            conn.sock.settimeout(None)
        except (OSError, ValueError, TypeError) as e:
            proc.kill()
            conn.close()
            self.store.set_run_status(run_id, "failed", error=f"the training process did not start: {e}")
            raise StudioError(f"the training process did not start: {e}") from None
        return self.follow(run_id, conn, proc, wait, algorithm)

    def follow(self, run_id: int, conn, process, wait: bool, algorithm: str = "ppo") -> RunHandle:
        """Mark a started job's run running and write what it streams from a thread (`_pump`); the same for a
        local process and a Ray actor (studio/cluster.py)."""
        self.store.set_run_status(run_id, "running")
        handle = RunHandle(run_id=run_id, _manager=self, _process=process, _cancel=_RemoteCancel(conn),
                           algorithm=algorithm)
        handle._thread = threading.Thread(target=self._pump, args=(handle, conn, process), daemon=True,
                                          name=f"ppo-pump-{run_id}")
        handle._thread.start()
        self.current = handle
        if wait:
            handle.wait()
        return handle

    def _pump(self, handle: RunHandle, conn, proc) -> None:
        """Write what the worker streams into the DuckDB file; decide the run's final status."""
        run_id, final = handle.run_id, None
        try:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                except ch.ChannelError as e:   # whatever sent it is not our job, or it is broken: stop it
                    proc.kill()
                    handle.error = f"the training process sent a message the studio does not accept ({e}); " \
                                   "the run was stopped"
                    log.warning("PPO run %s: %s", run_id, handle.error)
                    final = "failed"
                    break
                final = self._write_message(handle, msg) or final
        except Exception as e:   # e.g. the DB is gone while closing: the run will be marked at next start
            handle.error = f"{type(e).__name__}: {e}"
            final = "failed"
        finally:
            conn.close()
            try:
                proc.wait(timeout=60)
            except Exception:
                proc.kill()
            if final is None:     # the worker died without saying goodbye (kill -9, OOM killer)
                final = "interrupted"
                why = f"the training process exited unexpectedly (code {proc.returncode})"
                if proc.returncode == -9:
                    why += (": killed by signal 9, by a user or by the system's out-of-memory killer; resume "
                            f"it, and if memory ran out, {OOM_ADVICE}")
                handle.error = handle.error or why
            try:
                if final == "paused":
                    self.store.pause_run(run_id)
                else:
                    self.store.set_run_status(run_id, final, error=handle.error)
            except Exception:
                pass

    def _write_message(self, handle: RunHandle, msg: tuple) -> str | None:
        """Write one message of the worker into the DuckDB file; returns the run's final status where it says one
        ("done", "error")."""
        run_id, kind = handle.run_id, msg[0]
        if kind == "metrics":
            metrics, samples = msg[1], msg[2]
            step = int(metrics.get("step", 0))
            self.store.add_run_metrics(run_id, step, metrics)
            if samples:
                self.store.add_run_samples(run_id, step, samples)
        elif kind == "watch":
            from .watch import record
            record(self.store, run_id, msg[1])
        elif kind == "note":
            log.warning("PPO run %s: %s", run_id, msg[1])
            self.store.add_run_note(run_id, msg[1])
        elif kind == "checkpoint":
            self.store.put_checkpoint(run_id, int(msg[1]), msg[2])
        elif kind == "adapter":
            lm = self.lm
            handle.adapter_id = self.store.add_adapter(
                name=f"{handle.algorithm}-run{run_id}-step{msg[2]}", weights=msg[1],
                config={"run_id": run_id, "algorithm": handle.algorithm},
                base_model_id=lm.model_id, base_revision=lm.revision, run_id=run_id, step=int(msg[2]))
        elif kind == "done":
            return msg[1]
        elif kind == "error":
            handle.error = msg[1]
            log.warning("PPO run %s failed: %s\n%s", run_id, msg[1], msg[2] if len(msg) > 2 else "")
            return "failed"
        return None

    # -------------------------------------------------------------- adapters
    def activate_adapter(self, adapter) -> tuple[int | None, str | None]:
        """Map what the user picked (None/"base", an adapter id, or "adapter-<id>") to (id, loaded name)."""
        if adapter in (None, "", "base"):
            return None, None
        if isinstance(adapter, str):
            digits = adapter.rsplit("-", 1)[-1].split(":")[0].strip()
            if not digits.isdigit():
                raise StudioError(f"unknown adapter {adapter!r}: use 'base' or an adapter id from s.adapters()")
            adapter = int(digits)
        aid = int(adapter)
        lm = self.lm
        if self._loaded_adapters.get(aid) in getattr(lm.model, "peft_config", {}):
            return aid, self._loaded_adapters[aid]
        try:
            row = self.store.adapter(aid)
        except KeyError:
            raise StudioError(f"no adapter with id {aid}") from None
        from rlhf_studio.components.adapters import AdapterFormatError, load_adapter_blob
        # The content's digest in the name: a model shared by two Studios (a notebook's `model=s.lm`) may hold
        # another database's adapter of the same id, which must not stand in for this one.
        name = f"adapter-{aid}-{hashlib.sha256(row['weights'] or b'').hexdigest()[:12]}"
        try:
            with lm.lock:
                lm.model = load_adapter_blob(lm.model, row["weights"], name)
        except AdapterFormatError as e:
            raise StudioError(f"adapter {aid} cannot be used: {e}") from None
        except (RuntimeError, ValueError, KeyError) as e:   # e.g. a LoRA made for another model: size mismatch
            self._drop_adapter(name)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise StudioError(f"adapter {aid} cannot be used: it does not fit this model ({first})") from None
        self._loaded_adapters[aid] = name
        return aid, name

    def _drop_adapter(self, name: str) -> None:
        """Remove a half-loaded adapter so that the model is as it was."""
        lm = self.lm
        with lm.lock:
            if name in getattr(lm.model, "peft_config", {}):
                try:
                    with warnings.catch_warnings():      # peft warns when the deleted one was active
                        warnings.simplefilter("ignore")
                        lm.model.delete_adapter(name)
                except Exception as e:  # noqa: BLE001 - the model still works; the adapter just stays inactive
                    log.warning("could not remove adapter %s: %s", name, e)

    def export_adapter(self, adapter_id: int, path: str, merged: bool = False) -> str:
        from rlhf_studio.components.adapters import AdapterFormatError, unpack_adapter
        try:
            row = self.store.adapter(int(adapter_id))
        except KeyError:
            raise StudioError(f"no adapter with id {adapter_id}") from None
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(path) and os.listdir(path):
            raise StudioError(f"{path} exists and is not empty; choose a new folder")
        try:
            if not merged:
                return unpack_adapter(row["weights"], path)
            import tempfile
            from rlhf_studio.components.models import load_model
            from rlhf_studio.components.training.engine.adapter import save_adapter_folder
            from peft import PeftModel
            with tempfile.TemporaryDirectory() as d:
                unpack_adapter(row["weights"], d)
                lm = load_model(self.lm.model_id, device="cpu", dtype="fp32")
                model = PeftModel.from_pretrained(lm.model, d, adapter_name="export")
                save_adapter_folder(lm, model, "export", path, merged=True)
            return path
        except AdapterFormatError as e:
            raise StudioError(f"adapter {adapter_id} cannot be exported: {e}") from None

    def shutdown(self) -> None:
        h = self.current
        if h and h.running():
            h.cancel()
            h.wait(timeout=60)
            if h._process and h._process.poll() is None:
                h._process.kill()


if __name__ == "__main__":
    import sys
    worker_main(sys.argv[1:])
