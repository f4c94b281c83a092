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

from components.generation import GenerationError, SamplingParams, generate as _generate
from components.models import EMBEDDED, LoadedModel, ModelLoadError, load_model
from storage import InvalidInput, NotFound, Store, StorageError

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
                 read_only: bool = False):
        self.db_path = str(db)
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
        try:
            if not read_only:
                self.store.mark_running_interrupted()
            # A LoadedModel can be passed in (a notebook that already holds one, or tests sharing one).
            self.lm = model if isinstance(model, LoadedModel) else \
                load_model(model, device=device, dtype=dtype, quantization=quantization)
        except Exception:
            self.store.close()
            raise
        from .reward_service import RewardService
        self.reward = RewardService(self)
        from .jobs import JobManager
        self.jobs = JobManager(self)

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
            from components.generation import check_prompt
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
        train_ppo returns. Resume any run with resume_ppo(run_id)."""
        return self.jobs.start_training(algorithm, steps=steps, wait=wait, **settings)

    def runs(self):
        return self.store.runs()

    def adapters(self):
        return self.store.adapters()

    def export_adapter(self, adapter_id: int, path: str, merged: bool = False) -> str:
        return self.jobs.export_adapter(adapter_id, _path(path), merged=merged)

    def policy_winrates(self):
        """Blind-compare results per policy: wins, losses, ties and win rate (ties count half)."""
        import pandas as pd
        fb = self.store.feedback()
        fb = fb[fb["kind"] == "pairwise"] if len(fb) else fb
        cols = ["policy", "votes", "wins", "losses", "ties", "win_rate"]
        if len(fb) == 0:
            return pd.DataFrame(columns=cols)
        comp = self.store.completions().set_index("id")["adapter_id"]
        name = lambda a: "base" if pd.isna(a) else f"adapter-{int(a)}"  # noqa: E731
        stats: dict = {}
        for r in fb.itertuples():
            a, b = comp.get(r.completion_id), comp.get(r.other_completion_id)
            pa, pb = name(a), name(b)
            if pa == pb:
                continue
            for me, them_wins in ((pa, "b"), (pb, "a")):
                st = stats.setdefault(me, [0, 0, 0, 0])
                st[0] += 1
                mine = "a" if me == pa else "b"
                if r.winner == mine:
                    st[1] += 1
                elif r.winner == them_wins:
                    st[2] += 1
                else:
                    st[3] += 1
        rows = [(p, v, w, l, t, (w + 0.5 * t) / v) for p, (v, w, l, t) in sorted(stats.items())]
        return pd.DataFrame(rows, columns=cols)

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
            self.store.close()

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
