"""`Studio`: the whole app behind one object, for notebooks and for the Gradio UI alike.

It owns the one read-write `Store` of the DuckDB file and the loaded model, and wires the ML components to
storage; neither of those two knows about the other.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from rlhf_studio.components.generation import GenerationError, SamplingParams, generate as _generate
from rlhf_studio.components.models import EMBEDDED, LoadedModel, ModelLoadError, load_model
from rlhf_studio.storage import InvalidInput, NotFound, Store, StorageError

from .errors import StudioError, is_out_of_memory

WINNERS = ("a", "b", "tie", "both_bad")
THUMBS_DOWN_TAGS = ("harmful", "toxic", "incorrect", "off-topic", "unhelpful", "other")


@dataclass(frozen=True)
class Completion:
    id: int
    prompt_id: int
    text: str
    finish_reason: str
    completion_tokens: int
    adapter: str | None = None


class Studio:
    """RLHF Studio: generate, label, train the reward model and PPO, all kept in one DuckDB file.

    >>> s = Studio("feedback.duckdb")            # model="embedded": SmolLM2-135M-Instruct shipped as GGUF
    >>> cs = s.generate("Write a haiku about rain", n=4, max_new_tokens=48, seed=0)
    >>> s.rate(cs[0].id, stars=5)
    """

    def __init__(self, db: str = "rlhf-studio.duckdb", model: str | LoadedModel = EMBEDDED, *, device: str | None = None,
                 dtype: str | None = None, quantization: str | None = None, annotator: str = "local",
                 read_only: bool = False, export_dir: str | None = None,
                 cluster: str | None = None, cluster_workers: int = 1):
        self.db_path = str(db)
        from .files import Downloads, default_export_dir
        self.export_dir = os.path.abspath(export_dir) if export_dir else default_export_dir(self.db_path)
        self._downloads = Downloads()      # the app's export downloads, removed once served and at close
        self.download_keep_s = 60.0
        self.annotator = annotator
        self.store = Store(self.db_path, read_only=read_only)
        self._closed = False
        self._model_lock = threading.Lock()
        self._device, self._dtype, self._quantization = device, dtype, quantization
        self.lm: LoadedModel | None = None
        self._app = None
        self.accounts = None          # set by launch(): logins and roles
        self.blind = False
        self.session_id = uuid.uuid4().hex[:12]
        self.cluster = None           # training jobs run here unless a Ray cluster is given (studio/cluster.py)
        try:
            if cluster is None and cluster_workers != 1:
                raise StudioError(f"cluster_workers={cluster_workers!r} needs a Ray cluster: pass cluster='local' "
                                  "(Ray on this machine) or a Ray address (docs/CLUSTER.md)")
            if cluster is not None:       # cluster_workers: data-parallel workers per job (s.cluster.workers)
                from .cluster import Cluster
                self.cluster = Cluster(cluster, workers=cluster_workers)
            if not read_only:
                self.store.mark_running_interrupted()
            # A LoadedModel can be passed in (a notebook that already holds one, or tests sharing one).
            self.lm = model if isinstance(model, LoadedModel) else \
                load_model(model, device=device, dtype=dtype, quantization=quantization)
        except Exception:
            self.store.close()
            if self.cluster is not None:
                self.cluster.shutdown()
            raise
        self._wire_services()

    def _wire_services(self) -> None:
        """The services get what they need, not the studio: the store, the model loaded now, callbacks."""
        from .jobs import JobManager, memory_headroom_from_env
        from .reward_service import RewardService
        from .watch import job_spec
        model = lambda: self.lm      # noqa: E731 - switch_model replaces self.lm; the services follow it
        self.reward = RewardService(self.store, model)
        self.jobs = JobManager(self.store, model, reward_snapshot=self.reward.snapshot,
                               watch_spec=functools.partial(job_spec, self), cluster=self.cluster,
                               memory_headroom_mb=memory_headroom_from_env())

    # ----------------------------------------------------------------- model
    @property
    def model_id(self) -> str:
        return self.lm.model_id if self.lm else ""

    def switch_model(self, model: str, **kwargs) -> str:
        """Load another model; on failure the current one stays loaded and the error says why."""
        if self.jobs.busy():
            raise StudioError("a training job is running on the current model; cancel it or wait first")
        try:
            lm = load_model(model, device=kwargs.get("device", self._device), dtype=kwargs.get("dtype", self._dtype),
                            quantization=kwargs.get("quantization", self._quantization))
        except ModelLoadError as e:
            raise StudioError(f"{e} (the previous model {self.model_id!r} stays loaded)") from None
        with self._model_lock:
            self.lm = lm
        self.reward.model_changed()
        return lm.revision

    # ------------------------------------------------------------ generation
    def generate(self, prompt: str, n: int = 4, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int | None = None, adapter: str | int | None = None,
                 on_update: Callable[[list[str]], None] | None = None,
                 stop: Callable[[], bool] | None = None, prompt_source: str = "manual") -> list[Completion]:
        """Sample n completions of `prompt` in one batch and store prompt and completions."""
        params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        lm = self.lm
        # everything that could refuse the result is checked before minutes of sampling, not after
        if self.store.closed or self.store.read_only:
            raise StudioError(f"the database {self.db_path} is {'closed' if self.store.closed else 'open read-only'}"
                              "; nothing can be generated into it")
        if not isinstance(prompt_source, str) or not prompt_source.strip():
            raise StudioError(f"prompt_source must be a non-empty text, got {prompt_source!r}")
        adapter_id, adapter_name = self.jobs.activate_adapter(adapter)
        try:
            params.validate()
            from rlhf_studio.components.generation import check_prompt
            check_prompt(lm, prompt, max_new_tokens)
            outs = _generate(lm, prompt, params, adapter=adapter_name, on_update=on_update, stop=stop)
        except (GenerationError, KeyError) as e:
            raise StudioError(str(e).strip("'\"")) from None
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise StudioError(f"out of memory while generating {n} completions of up to {max_new_tokens} new "
                              "tokens: ask for fewer completions (n), lower max new tokens or shorten the "
                              "prompt") from None
        rows = [dict(text=g.text, source="model", model_id=lm.model_id, model_revision=lm.revision,
                     adapter_id=adapter_id, params=params.as_dict(), seed=seed, prompt_tokens=g.prompt_tokens,
                     completion_tokens=g.completion_tokens, finish_reason=g.finish_reason, latency_s=g.latency_s)
                for g in outs]
        pid, ids = self.store.add_generation(prompt, rows, source=prompt_source)
        cs = [Completion(id=i, prompt_id=pid, text=g.text, finish_reason=g.finish_reason,
                         completion_tokens=g.completion_tokens, adapter=adapter_name) for i, g in zip(ids, outs)]
        self.reward.completions_added(ids)
        return cs

    # -------------------------------------------------------------- feedback
    def _label(self, **fields) -> int:
        fields["annotator"] = fields.get("annotator") or self.annotator
        fields["session_id"] = fields.get("session_id") or self.session_id
        fid = self.store.add_feedback(**fields)
        self.reward.labels_changed()
        return fid

    def rate(self, completion_id: int, stars: int, criterion: str = "overall", *, annotator: str | None = None,
             session_id: str | None = None, idempotency_key: str | None = None) -> int:
        """Star rating 1..5 for one completion (per criterion). Returns the feedback id."""
        if isinstance(stars, bool) or not isinstance(stars, numbers.Integral) or not 1 <= stars <= 5:
            raise StudioError(f"stars must be a whole number from 1 to 5, got {stars!r}")
        return self._label(kind="stars", completion_id=_id(completion_id), stars=int(stars), criterion=criterion,
                           annotator=annotator, session_id=session_id, idempotency_key=idempotency_key)

    def thumbs(self, completion_id: int, up: bool, tags: Iterable[str] | None = None, criterion: str = "overall",
               *, annotator: str | None = None, session_id: str | None = None,
               idempotency_key: str | None = None) -> int:
        """Thumbs up or down; a thumbs-down may carry reason tags (harmful, toxic, incorrect, off-topic...)."""
        if not isinstance(up, (bool, np.bool_)):     # up="no" must not become a thumbs up
            raise StudioError(f"up must be True (thumbs up) or False (thumbs down), got {up!r}")
        if tags is not None and (isinstance(tags, (str, bytes, Mapping)) or not isinstance(tags, Iterable)):
            raise StudioError(f"tags must be a list of reason tags, got {tags!r}")
        tags = list(tags or [])
        if any(not isinstance(t, str) for t in tags):
            raise StudioError("each reason tag must be text")
        tags = [t.strip() for t in tags if t.strip()]
        if up and tags:
            raise StudioError("reason tags go with a thumbs-down only")
        return self._label(kind="thumbs", completion_id=_id(completion_id), up=bool(up), tags=tags or None,
                           criterion=criterion, annotator=annotator, session_id=session_id,
                           idempotency_key=idempotency_key)

    def compare(self, a: int, b: int, winner: str, criterion: str = "overall", *, annotator: str | None = None,
                session_id: str | None = None, idempotency_key: str | None = None) -> int:
        """Pairwise choice between two completions of the same prompt: "a" | "b" | "tie" | "both_bad"."""
        if winner not in WINNERS:
            raise StudioError(f"winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        return self._label(kind="pairwise", completion_id=_id(a), other_completion_id=_id(b), winner=winner,
                           criterion=criterion, annotator=annotator, session_id=session_id,
                           idempotency_key=idempotency_key)

    def rank(self, completion_ids: list[int], criterion: str = "overall", *, annotator: str | None = None,
             session_id: str | None = None, idempotency_key: str | None = None) -> int:
        """Ranking of completions of one prompt (all of them, or the ones shown), best first."""
        if isinstance(completion_ids, (str, bytes, Mapping)) or not isinstance(completion_ids, Iterable):
            raise StudioError(f"a ranking is a list of completion ids, best first, got {completion_ids!r}")
        ids = [_id(i) for i in completion_ids]
        return self._label(kind="ranking", ranking=ids, criterion=criterion,
                           annotator=annotator, session_id=session_id, idempotency_key=idempotency_key)

    def critique(self, completion_id: int, text: str | None = None, rewrite: str | None = None,
                 criterion: str = "overall", *, annotator: str | None = None, session_id: str | None = None,
                 idempotency_key: str | None = None) -> dict:
        """Free-text critique and/or a corrected rewrite (stored as a human completion linked to this one)."""
        for name, v in (("critique", text), ("rewrite", rewrite)):
            if v is not None and not isinstance(v, str):
                raise StudioError(f"the {name} must be text, got {type(v).__name__}")
        text = (text or "").strip()
        rewrite = (rewrite or "").strip() if rewrite is not None else None
        if not text and not rewrite:
            raise StudioError("write a critique or a corrected rewrite first")
        cid = _id(completion_id)
        out: dict = {}
        annotator = annotator or self.annotator
        session_id = session_id or self.session_id
        if text:
            out["critique_id"] = self._label(kind="critique", completion_id=cid, text=text, criterion=criterion,
                                             annotator=annotator, session_id=session_id,
                                             idempotency_key=idempotency_key and idempotency_key + ":c")
        if rewrite:
            fid, new_cid = self.store.add_rewrite(cid, rewrite, criterion=criterion, annotator=annotator,
                                                  session_id=session_id,
                                                  idempotency_key=idempotency_key and idempotency_key + ":r")
            self.reward.labels_changed()
            self.reward.completions_added([new_cid])
            out.update(rewrite_id=fid, rewrite_completion_id=new_cid)
        return out

    def retract(self, feedback_id: int, reason: str | None = None, *, annotator: str | None = None,
                session_id: str | None = None, own_only: bool = False, idempotency_key: str | None = None) -> dict:
        """Withdraw a label given by mistake. It stays in `feedback(history=True)` marked `retracted`; the label
        it had replaced, if any, is current again, and the reward model refits without it. Returns
        {"retraction_id", "label" (the withdrawn label), "restored_id" (the label current again, or None)}."""
        out = self.store.retract_feedback(feedback_id, annotator=annotator or self.annotator, own_only=own_only,
                                          session_id=session_id or self.session_id, reason=reason,
                                          idempotency_key=idempotency_key)
        self.reward.labels_changed()
        return out

    def undo(self, *, annotator: str | None = None, session_id: str | None = None,
             idempotency_key: str | None = None) -> dict:
        """Withdraw the newest label this annotator gave (from any session: notebook or browser, unless
        `session_id` names one) and has not withdrawn yet; call again to go further back. Imported labels are
        not undone (withdraw them by id with `retract`). Returns what `retract` returns; StudioError when there is
        nothing left to undo."""
        out = self.store.undo_last_feedback(annotator or self.annotator, session_id, idempotency_key=idempotency_key)
        self.reward.labels_changed()
        return out

    def add_criterion(self, name: str, description: str = "") -> None:
        """Add (or redescribe) a named criterion that annotators judge against."""
        self.store.add_criterion(name, description)

    def criteria(self):
        return self.store.criteria()

    # ---------------------------------------------------------------- prompts
    def add_prompts(self, texts: Iterable[str], source: str = "manual") -> list[int]:
        if not isinstance(texts, Iterable):
            raise StudioError(f"add_prompts expects a list of texts, got {texts!r}")
        return self.store.add_prompts(texts if isinstance(texts, str) else list(texts), source=source)

    def import_prompts(self, path: str) -> int:
        try:
            return self.store.import_prompts(_path(path))
        except OSError as e:         # storage's own refusals become StudioError in _user_errors
            raise StudioError(_msg(e)) from None

    def next_prompt(self, annotator: str | None = None) -> dict | None:
        return self.store.next_prompt(annotator=annotator)

    # ------------------------------------------------------------------ reads
    def prompts(self):
        return self.store.prompts()

    def completions(self, prompt_id: int | None = None):
        return self.store.completions(prompt_id)

    def feedback(self, history: bool = False):
        return self.store.feedback(history=history)

    # ------------------------------------------------------- reward (issue 3)
    def import_preferences(self, path: str, format: str = "hh") -> int:
        return self.reward.import_preferences(_path(path), format=format)

    def train_reward_model(self, tier: str = "deep", wait: bool = True, **config) -> int | None:
        return self.reward.train(tier=tier, wait=wait, **config)

    def score(self, completion_id: int) -> tuple[float, float]:
        return self.reward.score(completion_id)

    def score_text(self, prompt: str, completion: str) -> tuple[float, float]:
        return self.reward.score_text(prompt, completion)

    def reward_versions(self):
        return self.store.reward_versions()

    def reward_metrics(self):
        return self.store.reward_metrics()

    def suggest_pair(self, prompt_id: int | None = None):
        return self.reward.suggest_pair(prompt_id)

    # ---------------------------------------------------------- PPO (issue 4)
    def train_ppo(self, steps: int = 20, wait: bool = False, **config):
        return self.jobs.start_ppo(steps=steps, wait=wait, **config)

    def resume_ppo(self, run_id: int, wait: bool = False):
        return self.jobs.resume_ppo(run_id, wait=wait)

    # ---------------------------------------------------- any algorithm (issue 23)
    def train(self, algorithm: str = "ppo", steps: int = 20, wait: bool = False, **settings):
        """Train the policy's LoRA adapter with "ppo" | "rloo" | "grpo" (online, against the reward model) or
        "dpo" | "kto" (offline, on the compiled labels; `criterion=` picks which). Settings are the fields of
        the algorithm's config (components.training.config_class(algorithm)); returns the run handle that
        train_ppo returns. Resume any run with resume_ppo(run_id). The reward-hacking watch guards the online
        ones as it guards PPO (`watch=`: None/True for its defaults, False for off, or a dict of its settings)."""
        return self.jobs.start_training(algorithm, steps=steps, wait=wait, **settings)

    def runs(self):
        runs = self.store.runs()
        paused = self.store.paused_run_ids()        # stored 'cancelled'; see storage migration 6
        if paused:
            runs.loc[runs["id"].isin(paused), "status"] = "paused"
        return runs

    def adapters(self):
        return self.store.adapters()

    def export_adapter(self, adapter_id: int, path: str, merged: bool = False) -> str:
        return self.jobs.export_adapter(adapter_id, _path(path), merged=merged)

    def export_reward_model(self, version: int, path: str) -> dict:
        """Write reward version `version` as a folder that transformers.AutoModelForSequenceClassification
        loads (TRL, OpenRLHF, verl); returns what was measured (held-out pairs ranked alike, largest score
        difference), also saved in the folder's studio_export.json."""
        from .reward_export import export_reward_model
        return export_reward_model(self, _id(version), _path(path))

    def policy_winrates(self):
        """Votes per policy from the current pairwise labels between completions of two different policies (every
        criterion): policy, votes, wins, losses, ties (ties + both bad), win_rate (ties count half). The same
        counts and policy names ("base", "<adapter name> #<id>") as the dashboard's leaderboard."""
        from . import dashboards
        return dashboards.policy_record(self.store, criterion=None)

    # ------------------------------------------------------- data (issue 5)
    def export(self, kind: str, path: str, format: str = "parquet", **options) -> int:
        """kind preference|unpaired|sft|raw; format parquet|jsonl|csv; options: conversational, criterion,
        split, metadata. Derived from the same SQL views the reward model trains from."""
        from . import exports
        unknown = sorted(set(options) - {"conversational", "criterion", "split", "metadata"})
        if unknown:
            raise StudioError(f"unknown export option(s) {', '.join(unknown)}: use conversational, criterion, "
                              "split or metadata")
        return exports.export(self.store, kind, _path(path), format, **options)

    def import_rated(self, path: str, criterion: str = "overall", scale: str = "auto") -> dict:
        """UltraFeedback-like rated completions (a prompt, several completions with scores) as star labels."""
        from . import exports
        out = exports.import_rated(self.store, _path(path), criterion=criterion, scale=scale)
        if out["completions"]:
            self.reward.start_feature_job()
        return out

    def leaderboard(self, criterion: str = "overall", blind_only: bool = False):
        """Policies (base and each adapter) ranked by a Bradley-Terry score from pairwise votes, with CIs."""
        from . import dashboards
        return dashboards.leaderboard_table(self.store, criterion, blind_only)

    # ------------------------------------------------- evaluation (issue 22)
    def evaluate(self, policy: str | int, baseline: str | int = "base", prompts: list[str] | None = None,
                 judge="reward", n: int | None = None, criterion: str = "overall", seed: int = 0,
                 max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95) -> dict:
        """Compare `policy` with `baseline` ("base", an adapter id or "adapter-<id>") on held-out prompts.

        prompts: None = the held-out prompts (`heldout_prompts()`, less any the policies' runs trained on), else a
        list of texts (marked held-out from then on); n: at most this many prompts. One completion per prompt
        and side, the same seed on both sides (seed + prompt index). judge: "reward" (the current reward model's
        scores), "human" (blind pairs queued to annotators, each side first at random; the result fills in as
        votes arrive, see `next_evaluation_pair`) or a function judge(prompt, first, second) -> "a" (first is
        better) | "b" | "tie", called with the sides in a random order per pair. Returns the result: win_rate of
        the policy with ties as one half, ci_low/ci_high (Wilson 95%), mean policy/baseline length in tokens
        and in characters, and the reward model's agreement with the human votes on the same pairs."""
        from . import evaluation
        return evaluation.evaluate(self, policy, baseline, prompts=prompts, judge=judge, n=n, criterion=criterion,
                                   seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)

    def evaluation(self, evaluation_id: int) -> dict:
        """One evaluation's result as it stands now (human votes that arrived since included)."""
        from . import evaluation
        return evaluation.result(self.store, evaluation_id)

    def evaluations(self):
        """Every evaluation with its lineage and result, oldest first (a DataFrame)."""
        from . import evaluation
        return evaluation.evaluations_frame(self.store)

    def evaluation_pairs(self, evaluation_id: int):
        """An evaluation's pairs: prompt, both completions, their lengths, the judge's verdict, reward scores."""
        return self.store.evaluation_pairs(evaluation_id)

    def next_evaluation_pair(self, annotator: str | None = None) -> dict | None:
        """The next blind pair of a human-judged evaluation this annotator has not voted on: prompt, criterion,
        left_id/right_id and their texts. Vote with `compare(left_id, right_id, winner, criterion=...)`."""
        return self.store.next_evaluation_pair(annotator or self.annotator)

    def heldout_prompts(self):
        """The prompts kept aside from training: about one in five by a hash of the text, plus those marked."""
        from . import evaluation
        return evaluation.heldout_prompts(self.store)

    def hold_out(self, prompts: Iterable[str | int]) -> int:
        """Keep prompts (texts, added if new, or prompt ids) aside from training. Returns how many are new."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise StudioError(f"hold_out expects a list of prompt texts or ids, got {prompts!r}")
        items = list(prompts)
        texts = [p for p in items if isinstance(p, str)]
        ids = [_id(p) for p in items if not isinstance(p, str)] + (self.store.add_prompts(texts) if texts else [])
        return self.store.mark_prompts_heldout(ids)

    def load_starter_prompts(self) -> int:
        """Add the studio's small set of everyday prompts to the library (for a newcomer who has none).
        Prompts already there are not added twice. Returns how many were new."""
        from importlib.resources import files
        text = files(__package__).joinpath("data", "starter_prompts.txt").read_text(encoding="utf-8")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        before = len(self.store.prompts())
        self.store.add_prompts(lines, source="starter")
        return len(self.store.prompts()) - before

    # ------------------------------------------------ the app's files (issue 26)
    def resolve_export_path(self, path: str) -> str:
        """A path typed into the app, as an absolute path inside `export_dir` (made if missing); a path that
        leads out of it (`..`, elsewhere, a symbolic link) is refused with a StudioError."""
        from .files import confined_path
        return confined_path(self.export_dir, path)

    def app_export_reward_model(self, version: int, path: str) -> dict:
        """The app's reward-model export: like export_reward_model, into a folder inside `export_dir` only."""
        return self.export_reward_model(version, self.resolve_export_path(path))

    def app_export_adapter(self, adapter_id: int, path: str, merged: bool = False) -> str:
        """The app's adapter export: like export_adapter, into a folder inside `export_dir` only."""
        return self.export_adapter(adapter_id, self.resolve_export_path(path), merged=merged)

    def export_download(self, kind: str, format: str = "parquet", **options) -> tuple[int, str]:
        """Export training data into a private temporary file for the app to serve: (rows, path). The file is
        removed `download_keep_s` seconds later (the app has served its copy by then) or at close, whichever
        comes first; a notebook writes where it wants with export()."""
        import shutil
        import time
        from . import exports
        folder, stamp = self._downloads.new_folder(), time.strftime("%Y%m%d-%H%M%S")
        try:
            if kind == "raw":
                target = os.path.join(folder, f"raw-{stamp}")
                n = exports.export(self.store, "raw", target, format)
                path = shutil.make_archive(target, "zip", target)
                shutil.rmtree(target, ignore_errors=True)
            else:
                ext = "jsonl" if format == "jsonl" else format
                conv = "-conversational" if options.get("conversational") else ""
                path = os.path.join(folder, f"{kind}{conv}-{stamp}.{ext}")
                n = exports.export(self.store, kind, path, format, **options)
        except BaseException:
            self._downloads.drop(folder)
            raise
        self._downloads.drop_later(folder, self.download_keep_s)
        return n, path

    def drop_download(self, path) -> None:
        """Remove a download made by export_download (after the browser got it)."""
        self._downloads.drop(path)

    # ---------------------------------------------------------- logins (issue 26)
    def login_lockouts(self):
        """Client addresses now locked out of the login after too many failures ("*": everyone, past the
        overall limit), with failures counted and seconds left; empty without logins."""
        import pandas as pd
        rows = self.accounts.lockouts() if self.accounts is not None else []
        return pd.DataFrame(rows, columns=["address", "failures", "seconds_left"])

    def clear_login_lockouts(self) -> None:
        """Let locked-out addresses try again now (an owner who knows who they are)."""
        if self.accounts is not None:
            self.accounts.clear_lockouts()

    # ------------------------------------------ what the app's tabs read (studio/views.py; notebooks too)
    reason_tags = THUMBS_DOWN_TAGS

    @property
    def storage_warnings(self) -> list[str]:
        """What the start-up checks of the database file found (a write-ahead log moved aside, ...)."""
        return list(self.store.warnings)

    def my_stars(self, completion_ids: Iterable[int], annotator: str | None = None,
                 criterion: str = "overall") -> dict[int, int]:
        """{completion id: stars} of an annotator's (default: this studio's) current star labels on these
        completions for a criterion."""
        from . import views
        return views.my_stars(self.store, completion_ids, annotator or self.annotator, criterion)

    def completion_scores(self, completion_ids: Iterable[int]) -> list[tuple[float, float, str] | None]:
        """(score, uncertainty, "fast vN") of the fast reward tier per completion id; None where no reward model
        exists yet. Cheap for completions whose features are cached."""
        return self.reward.visible_scores(list(completion_ids))

    def completion_count(self) -> int:
        return self.store.completion_count()

    def reward_status(self) -> dict:
        """The reward model's background work: progress (running, done, total, message), deep_training,
        last_error, deep_every, fast_version."""
        from . import views
        return views.reward_status(self.reward)

    def set_deep_every(self, k: int) -> int:
        """Train a new deep reward-model version after every k new pairs (0: only on demand); returns k."""
        self.reward.settings.deep_every = max(0, int(k or 0))
        return self.reward.settings.deep_every

    def deep_reward_version(self, look_up: bool = True) -> int | bool | None:
        """The newest deep reward-model version, False where none exists (look_up=False: None where that is
        not known without reading the database)."""
        from . import views
        return views.deep_reward_version(self.reward, look_up)

    def ppo_memory_estimate(self, **settings) -> dict:
        """Estimated peak memory of a PPO run with these PPOConfig settings: {"bytes", "available_bytes", ...}."""
        from rlhf_studio.components.training.ppo_config import PPOConfig
        return self.jobs.memory_estimate(PPOConfig(**settings))

    def running_ppo(self) -> int | None:
        """The run id of the PPO job running in the background, or None."""
        return self.jobs.current.run_id if self.jobs.busy() else None

    def latest_ppo(self) -> int | None:
        """The run id of the PPO job started last by this studio (running or not), else the newest PPO run."""
        if self.jobs.current is not None:
            return self.jobs.current.run_id
        r = self.store.runs()
        r = r[r["kind"] == "ppo"] if len(r) else r
        return int(r["id"].max()) if len(r) else None

    def cancel_ppo(self) -> int:
        """Cancel the running PPO job at its next step boundary (its checkpoint kept); returns its run id."""
        h = self.jobs.current
        if not h or not h.running():
            raise StudioError("no training job is running")
        h.cancel()
        return h.run_id

    def run(self, run_id: int) -> dict:
        """One run (PPO or deep reward update): status, config, lineage, error, notes."""
        return self.store.run(run_id)

    def run_metrics(self, run_id: int):
        return self.store.run_metrics(run_id)

    def run_samples(self, run_id: int):
        return self.store.run_samples(run_id)

    def dashboard(self, criterion: str | None = None, blind_only: bool = False, hide_policies: bool = False) -> dict:
        """Every Dashboard figure and table (see studio.views.dashboard); criterion None: all criteria."""
        from . import views
        return views.dashboard(self.store, self.reward, criterion, blind_only, hide_policies)

    # ------------------------------------------------------- reward-hacking watch (studio/watch.py)
    def watch_checks(self, run_id: int):
        """Every check of the watch on a PPO run, oldest first: step, verdict, reason, the signals (reward, judge,
        kl, length, length_corr, distinct_1, distinct_2, no_eos, ...), examples, whether it was the best so far."""
        return self.store.watch_checks(_id(run_id))

    def watch_pause(self, run_id: int) -> dict | None:
        """Why the watch paused this run (its check, with reason and examples), or None if it is not paused."""
        return self.store.run_pause(_id(run_id))

    def rollback(self, run_id: int) -> int:
        """A new adapter from the run's best check by the second judge; returns its adapter id."""
        from .watch import rollback
        return rollback(self, _id(run_id))

    def watch_stop(self, run_id: int) -> None:
        """End a watch pause without resuming: the run stays 'cancelled' (its checkpoint kept)."""
        rid = _id(run_id)
        if self.store.run_pause(rid) is None:
            raise StudioError(f"run {rid} is not paused by the watch")
        self.store.set_run_status(rid, "cancelled")

    def watch_audit(self, run_id: int, n: int = 4, max_new_tokens: int = 48) -> list[dict]:
        """A short blind audit: the run's current policy vs its best checkpoint on n probe prompts, sides shuffled.
        Returns [{prompt, a, b, a_text, b_text}]; vote with `compare(a, b, winner)` (a label like any other)."""
        from .watch import audit
        return audit(self, _id(run_id), n=int(n), max_new_tokens=int(max_new_tokens))

    # -------------------------------------------------------------- app & io
    def backup(self, path: str) -> str:
        self.store.backup(_path(path))
        return path

    def launch(self, share: bool = False, auth=None, host: str = "127.0.0.1", port: int | None = None,
               inline: bool | None = None, open_browser: bool = False, prevent_thread_lock: bool = True,
               auth_file: str | None = None, blind: bool = False, max_queue: int | None = 64):
        """Start the Gradio app (inline in Jupyter). Returns the running Blocks; `.local_url` has the address.

        auth "USER:PASS" (one owner) or auth_file (accounts with roles owner/annotator); share=True always
        requires a login (a password is generated if none is given); blind hides identities and scores;
        max_queue: requests that may wait, more are answered at once with "busy, please try again"."""
        from .app import launch_app
        self._app = launch_app(self, share=share, auth=auth, host=host, port=port, inline=inline,
                               open_browser=open_browser, prevent_thread_lock=prevent_thread_lock,
                               auth_file=auth_file, blind=blind, max_queue=max_queue)
        return self._app

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.jobs.shutdown()
            self.reward.shutdown()
        finally:
            if self._app is not None:
                try:
                    self._app.close()
                except Exception:
                    pass
            self._downloads.close()
            self.store.close()
            if self.cluster is not None:
                self.cluster.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Studio(db={self.db_path!r}, model={self.model_id!r})"


def _path(p) -> str:
    if not isinstance(p, (str, os.PathLike)) or not os.fspath(p):
        raise StudioError(f"a file path is needed, got {p!r}")
    return os.fspath(p)


def _id(v) -> int:
    """A row id given by a caller: a whole number (not True, not 1.9, not "1")."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise StudioError(f"an id must be a whole number, got {v!r}")
    if not 0 < v < 2 ** 63:
        raise StudioError(f"no completion with id {v}")
    return int(v)


def _msg(e: Exception) -> str:
    s = str(e)
    if isinstance(e, KeyError) and len(s) > 1 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1]
    return s


def _user_errors(method):
    """Bad input found by storage (InvalidInput, NotFound) reaches the caller as a StudioError, whichever public
    method it came through; operational failures (disk full, a write conflict) stay StorageErrors."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (InvalidInput, NotFound) as e:
            raise StudioError(_msg(e)) from None
    return wrapper


for _name, _member in list(vars(Studio).items()):
    if not _name.startswith("_") and inspect.isfunction(_member):
        setattr(Studio, _name, _user_errors(_member))
