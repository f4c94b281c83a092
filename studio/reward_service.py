"""The reward model inside the app: features cached per model, the fast tier refit after every label, the
deep tier trained in the background every K new pairs, honest held-out metrics, and active learning."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .exports import import_preferences

if TYPE_CHECKING:
    from rlhf_studio.components.models import LoadedModel

log = logging.getLogger("rlhf_studio.reward")

MIN_HELDOUT = 10        # fewer held-out pairs than this: no accuracy is shown as fact
MIN_TRAIN = 2


@dataclass
class RewardSettings:
    """How the app trains its reward models (the notebook can change these on `s.reward.settings`)."""
    criterion: str | dict = "overall"   # a criterion name, or {name: weight} to combine several
    deep_every: int = 16                # train a new deep version after this many new pairs (0: only on demand)
    deep_replay: int = 48               # older pairs replayed with each incremental deep update
    feature_max_tokens: int = 256       # truncation (keeping the end of prompt+completion) for features
    feature_batch: int = 8
    store_fast_weights_every: int = 10  # auto refits store weights every N labels (metrics always)
    # "incremental": warm-started Newton in completion space on a cached feature matrix (fit_indexed);
    # "full": the earlier refit from scratch on dense [pairs, F] rows (kept as the reference and the baseline
    # of bench/bench_reward_latency.py). Both reach the same optimum (same objective, same tolerance).
    fast_refit: str = "incremental"


@dataclass
class Progress:
    """State of the background feature job, shown as a progress bar."""
    done: int = 0
    total: int = 0
    running: bool = False
    message: str = ""


class RewardService:
    """The reward model of one store. `model` returns the loaded LM now (the studio may switch models); the
    service holds neither the studio nor the app."""

    def __init__(self, store, model: Callable[[], "LoadedModel"], settings: RewardSettings | None = None):
        self.store = store
        self._model = model
        self.settings = settings or RewardSettings()
        self.fast = None                      # components.reward.fast.FastRewardModel
        self.fast_version: int | None = None
        self.fast_l2: float | None = None
        self._l2_pairs = 0
        self.deep = None                      # components.reward.deep.DeepRewardModel
        self.deep_version: int | None = None
        self._deep_pairs_at_last = 0
        self._features: dict[int, np.ndarray] = {}
        self._lock = threading.RLock()
        self._labels_since_store = 0
        # feature matrix cache for incremental refits: rows of _fx for the completion ids in _fx_index
        self._fx: np.ndarray | None = None
        self._fx_n = 0
        self._fx_pos: dict[int, int] = {}
        self.last_refit: dict = {}            # seconds per stage of the last fast refit (for benchmarks)
        self.progress = Progress()
        self._stop = threading.Event()
        self._deep_thread: threading.Thread | None = None
        self._feature_thread: threading.Thread | None = None
        self.last_error: str | None = None

    # --------------------------------------------------------------- features
    @property
    def lm(self) -> "LoadedModel":
        """The loaded model the features, scores and the deep tier use."""
        return self._model()

    @property
    def revision(self) -> str:
        return self.lm.revision

    def texts(self, ids: list[int]) -> tuple[list[str], list[str]]:
        """(prompts, completion texts) of completion ids, in their order."""
        df = self.store.completion_texts(ids)
        by_id = {int(r.id): (r.prompt, r.text) for r in df.itertuples()}
        return [by_id[i][0] for i in ids], [by_id[i][1] for i in ids]

    def features(self, ids, progress=None, stop=None) -> dict[int, np.ndarray]:
        """Feature vectors of completions: memory, then the DB cache, then computed (and cached)."""
        from rlhf_studio.components.reward.extract import extract_features
        ids = [int(i) for i in dict.fromkeys(ids)]
        missing = [i for i in ids if i not in self._features]
        if missing:
            self._features.update(self.store.get_features(self.revision, missing))
            missing = [i for i in missing if i not in self._features]
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            prompts, texts = self.texts(chunk)
            X = extract_features(self.lm, prompts, texts, batch_size=self.settings.feature_batch,
                                 max_tokens=self.settings.feature_max_tokens, stop=stop,
                                 progress=(lambda d, t, s=start: progress(s + d, len(missing))) if progress else None)
            self.store.put_features(self.revision, chunk, X)
            for i, v in zip(chunk, X):
                self._features[i] = np.asarray(v, dtype=np.float32)
        return {i: self._features[i] for i in ids if i in self._features}

    def completions_added(self, ids) -> None:
        """New completions: compute their features now so that the next label refits at once."""
        try:
            self.features(ids)
        except Exception as e:  # never fail a generation because of scoring
            self.last_error = f"features: {e}"
            log.warning("could not compute features: %s", e)

    def model_changed(self) -> None:
        with self._lock:
            self._features.clear()
            self._fx, self._fx_n, self._fx_pos = None, 0, {}
            self.fast = None
            self.fast_version = None
            self.deep = None
            self.deep_version = None

    # ------------------------------------------------------------- fast tier
    def pairs(self):
        return self.store.preference_pairs(self.settings.criterion)

    def labels_changed(self) -> None:
        """A label was added or withdrawn: refit the fast tier on every pair (well under a second), then maybe
        start a deep update."""
        try:
            self.refit_fast()
        except Exception as e:
            self.last_error = f"fast refit: {e}"
            log.warning("fast refit failed: %s", e)
        self._maybe_train_deep()

    def refit_fast(self, store_weights: bool | None = None) -> int | None:
        """Refit the fast tier on every current pair and store a version (metrics; weights every N labels)."""
        if self.settings.fast_refit == "full":
            return self._refit_fast_full(store_weights)
        from rlhf_studio.components.reward.fast import FastRewardModel
        with self._lock:
            t = {"start": time.perf_counter()}
            pairs = self.pairs()
            t["pairs"] = time.perf_counter()
            if len(pairs) == 0:
                return self._too_few_pairs()
            chosen = pairs["chosen_id"].to_numpy(dtype=np.int64)
            rejected = pairs["rejected_id"].to_numpy(dtype=np.int64)
            X, ci, ri = self._feature_rows(chosen, rejected)
            ok = (ci >= 0) & (ri >= 0)
            heldout = pairs["heldout"].to_numpy(dtype=bool)
            tr, te = ok & ~heldout, ok & heldout
            n_train = int(tr.sum())
            t["features"] = time.perf_counter()
            if n_train < MIN_TRAIN:
                return self._too_few_pairs()
            # Cross-validate L2 when the training set grew by a quarter; reuse it in between (fast refits).
            cv = self.fast_l2 is None or n_train >= 1.25 * max(self._l2_pairs, 1) or n_train < 40
            t0 = time.perf_counter()
            margin = bt_margins(pairs["margin"].to_numpy())[tr]
            model = FastRewardModel().fit_indexed(X, ci[tr], ri[tr], margin=margin,
                                                  l2=None if cv else self.fast_l2, warm_start=self.fast)
            fit_s = time.perf_counter() - t0
            t["fit"] = time.perf_counter()
            if cv:
                self.fast_l2, self._l2_pairs = model.l2, n_train
            metrics = self._evaluate_indexed(model, X, ci[te], ri[te])
            t["evaluate"] = time.perf_counter()
            metrics.update(fit_seconds=fit_s, train_pairs=n_train, l2=float(model.l2),
                           conflicts=_conflicts(pairs))
            vid, keep = self._store_fast_version(model, zip(chosen[tr].tolist(), rejected[tr].tolist()), metrics,
                                                 store_weights)
            t["store"] = time.perf_counter()
            self.fast, self.fast_version = model, vid
            names = list(t)
            self.last_refit = {b: t[b] - t[a] for a, b in zip(names, names[1:])}
            self.last_refit.update(total=t[names[-1]] - t["start"], stored_weights=bool(keep), cv=bool(cv))
            return vid

    def _too_few_pairs(self) -> None:
        """Too few pairs to fit (say, after labels were withdrawn): no fast model, rather than one fitted on
        labels that no longer count."""
        self.fast, self.fast_version = None, None
        return None

    def _feature_rows(self, chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, ci, ri): a cached feature matrix X whose rows ci / ri hold the features of the chosen / rejected
        completions; -1 where a completion has no features (yet). Rows are appended for new completions only."""
        ids = np.unique(np.concatenate([chosen, rejected]))
        new = [int(i) for i in ids if int(i) not in self._fx_pos]
        if new:
            feats = self.features(new)
            have = [i for i in new if i in feats]
            if have:
                F = len(feats[have[0]])
                if self._fx is None or self._fx.shape[1] != F:
                    self._fx, self._fx_n, self._fx_pos = np.zeros((max(256, len(have)), F), np.float32), 0, {}
                if self._fx_n + len(have) > self._fx.shape[0]:
                    grown = np.zeros((max(2 * self._fx.shape[0], self._fx_n + len(have)), F), np.float32)
                    grown[:self._fx_n] = self._fx[:self._fx_n]
                    self._fx = grown
                self._fx[self._fx_n:self._fx_n + len(have)] = np.stack([feats[i] for i in have])
                for k, i in enumerate(have):
                    self._fx_pos[i] = self._fx_n + k
                self._fx_n += len(have)
        pos = self._fx_pos
        lookup = np.array([pos.get(int(i), -1) for i in ids], dtype=np.int64)
        ci = lookup[np.searchsorted(ids, chosen)]
        ri = lookup[np.searchsorted(ids, rejected)]
        X = self._fx[:self._fx_n] if self._fx is not None else np.zeros((0, 0), np.float32)
        return X, ci, ri

    def _evaluate_indexed(self, model, X, ci, ri) -> dict:
        n = len(ci)
        out = {"heldout_pairs": n}
        if n == 0:
            out.update(heldout_accuracy=None, heldout_loss=None, note="no held-out pairs yet")
            return out
        ev = model.evaluate_indexed(X, ci, ri)
        out.update(heldout_accuracy=float(ev["accuracy"]), heldout_loss=float(ev["loss"]),
                   ece=float(ev.get("ece", float("nan"))), bins=_jsonable(ev.get("bins")))
        if n < MIN_HELDOUT:
            out["note"] = f"only {n} held-out pairs: accuracy is not meaningful yet (need {MIN_HELDOUT})"
        return out

    def _refit_fast_full(self, store_weights: bool | None = None) -> int | None:
        """The reference refit: from scratch on dense [pairs, F] rows, as before incremental refits."""
        from rlhf_studio.components.reward.fast import FastRewardModel
        with self._lock:
            pairs = self.pairs()
            if len(pairs) == 0:
                return self._too_few_pairs()
            feats = self.features(list(pairs["chosen_id"]) + list(pairs["rejected_id"]))
            pairs = pairs[pairs["chosen_id"].isin(feats.keys()) & pairs["rejected_id"].isin(feats.keys())]
            train = pairs[~pairs["heldout"]]
            test = pairs[pairs["heldout"]]
            if len(train) < MIN_TRAIN:
                return self._too_few_pairs()
            Xc = np.stack([feats[int(i)] for i in train["chosen_id"]])
            Xr = np.stack([feats[int(i)] for i in train["rejected_id"]])
            margin = bt_margins(train["margin"].to_numpy())
            # Cross-validate L2 when the training set grew by a quarter; reuse it in between (fast refits).
            cv = self.fast_l2 is None or len(train) >= 1.25 * max(self._l2_pairs, 1) or len(train) < 40
            t0 = time.perf_counter()
            model = FastRewardModel()
            model.fit(Xc, Xr, margin=margin, l2=None if cv else self.fast_l2)
            fit_s = time.perf_counter() - t0
            if cv:
                self.fast_l2, self._l2_pairs = model.l2, len(train)
            metrics = self._evaluate(model, test, feats)
            metrics.update(fit_seconds=fit_s, train_pairs=len(train), l2=float(model.l2),
                           conflicts=int(self.store.pair_conflicts(self.settings.criterion)))
            vid, _ = self._store_fast_version(model, zip(train["chosen_id"], train["rejected_id"]), metrics,
                                              store_weights)
            self.fast, self.fast_version = model, vid
            return vid

    def _store_fast_version(self, model, train_pairs, metrics: dict, store_weights: bool | None
                            ) -> tuple[int, bool]:
        """A version row for a fast refit: its metrics always; its weights and pair ids every
        `store_fast_weights_every` refits (or when asked), since a refit after every label would bloat the file.
        Returns (version id, whether the weights were stored)."""
        self._labels_since_store += 1
        keep = store_weights if store_weights is not None else (
            self._labels_since_store >= self.settings.store_fast_weights_every or self.fast_version is None)
        pair_keys = [f"{a}>{b}" for a, b in train_pairs]
        vid = self.store.add_reward_version(
            tier="fast", criterion=_criterion_key(self.settings.criterion),
            config={"l2": float(model.l2), "feature_max_tokens": self.settings.feature_max_tokens,
                    "model_revision": self.revision, "pairs_sha1": _digest(pair_keys)},
            pair_ids=pair_keys if keep else [], labels_seen=int(self._labels_seen()), metrics=metrics,
            weights=model.to_bytes() if keep else None, parent_id=self.fast_version)
        if keep:
            self._labels_since_store = 0
        return vid, keep

    def _labels_seen(self) -> int:
        return int(self.store.stats().get("feedback", 0))

    def _evaluate(self, model, test, feats) -> dict:
        n = len(test)
        out = {"heldout_pairs": n}
        if n == 0:
            out.update(heldout_accuracy=None, heldout_loss=None, note="no held-out pairs yet")
            return out
        Xc = np.stack([feats[int(i)] for i in test["chosen_id"]])
        Xr = np.stack([feats[int(i)] for i in test["rejected_id"]])
        ev = model.evaluate(Xc, Xr)
        out.update(heldout_accuracy=float(ev["accuracy"]), heldout_loss=float(ev["loss"]),
                   ece=float(ev.get("ece", float("nan"))), bins=_jsonable(ev.get("bins")))
        if n < MIN_HELDOUT:
            out["note"] = f"only {n} held-out pairs: accuracy is not meaningful yet (need {MIN_HELDOUT})"
        return out

    # -------------------------------------------------------------- scoring
    def fast_model(self):
        """The fast tier: in memory, else the newest stored version of this model, else refitted now; None while
        there are too few training pairs."""
        if self.fast is None:
            if int((~self.pairs()["heldout"]).sum()) < MIN_TRAIN:    # the newest version may predate withdrawals
                return None
            self._load_latest("fast")
            if self.fast is None:
                self.refit_fast()
        return self.fast

    def _load_latest(self, tier: str) -> None:
        from rlhf_studio.components.reward.fast import FastRewardModel
        v = self.store.latest_reward_version(tier, with_weights=True)
        if v is None or v.get("weights") is None:
            return
        if (json.loads(v["config"]) if isinstance(v["config"], str) else v["config"]).get(
                "model_revision") != self.revision:
            return
        if tier == "fast":
            self.fast, self.fast_version = FastRewardModel.from_bytes(v["weights"]), int(v["id"])
        else:
            from rlhf_studio.components.reward.deep import DeepRewardModel
            self.deep = DeepRewardModel.from_bytes(self.lm, v["weights"], replace_adapter=True)
            self.deep_version = int(v["id"])

    def visible_scores(self, ids) -> list[tuple[float, float, str] | None]:
        """(mean, std, tier) per completion id for the cards on screen; None where no model exists yet."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        try:
            model = self.fast_model()
            if model is None:
                return [None] * len(ids)
            feats = self.features(ids)
            X = np.stack([feats[i] for i in ids])
            mean, std = model.score(X)
            return [(float(m), float(s), f"fast v{self.fast_version}") for m, s in zip(mean, std)]
        except Exception as e:
            self.last_error = f"scores: {e}"
            return [None] * len(ids)

    def score(self, completion_id: int, tier: str | None = None) -> tuple[float, float]:
        from .errors import StudioError
        tier = tier or ("deep" if self.has_deep() else "fast")
        if tier == "deep" and self.has_deep():
            prompts, texts = self.texts([int(completion_id)])
            s = float(self.deep.score(prompts, texts)[0])
            _, std = self._fast_score_ids([int(completion_id)])
            return s, float(std[0]) if std is not None else float("nan")
        model = self.fast_model()
        if model is None:
            raise StudioError("no reward model yet: give a few labels (pairs) first")
        self.store.get_completion(int(completion_id))
        mean, std = self._fast_score_ids([int(completion_id)])
        return float(mean[0]), float(std[0])

    def _fast_score_ids(self, ids):
        if self.fast_model() is None:
            return None, None
        feats = self.features(ids)
        return self.fast.score(np.stack([feats[i] for i in ids]))

    def score_text(self, prompt: str, completion: str, tier: str | None = None) -> tuple[float, float]:
        from rlhf_studio.components.reward.extract import extract_features
        from .errors import StudioError
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise StudioError("prompt and completion must be text")
        if self.fast_model() is None:
            raise StudioError("no reward model yet: give a few labels (pairs) first")
        X = extract_features(self.lm, [prompt], [completion], max_tokens=self.settings.feature_max_tokens)
        mean, std = self.fast.score(X)
        if (tier or ("deep" if self.has_deep() else "fast")) == "deep" and self.has_deep():
            return float(self.deep.score([prompt], [completion])[0]), float(std[0])
        return float(mean[0]), float(std[0])

    def has_deep(self) -> bool:
        """Whether a deep version of this model exists (loading the newest stored one if none is in memory)."""
        if self.deep is None:
            try:
                self._load_latest("deep")
            except Exception as e:
                self.last_error = f"deep load: {e}"
        return self.deep is not None

    def deep_training(self) -> bool:
        """Whether a deep update is training in the background now."""
        return self._deep_thread is not None and self._deep_thread.is_alive()

    def snapshot(self, tier: str | None = None) -> tuple[str, int]:
        """(tier, version) a training job should score with: the newest deep version (tier None or "deep"), else
        the fast tier refitted now with its weights stored; a StudioError where there is no such model."""
        from .errors import StudioError
        if tier in (None, "deep") and self.has_deep():
            return "deep", self.deep_version
        if tier == "deep":
            raise StudioError("no deep reward model yet: train one first (Reward tab) or pick the fast tier")
        version = self.refit_fast(store_weights=True)
        if version is None:
            raise StudioError("no reward model yet: give some pairwise/ranking/star labels first")
        return "fast", version

    # -------------------------------------------------------- active learning
    def suggest_pair(self, prompt_id: int | None = None) -> dict | None:
        """The unlabelled pair of completions (same prompt) where the fast tier is least certain."""
        model = self.fast_model()
        cands = self.store.unlabelled_pairs(prompt_id=prompt_id, limit=2000)
        if len(cands) == 0:
            return None
        if model is None:
            # No model yet: a pair spread over the pool by a hash of its ids, not the first in the table's order
            # (those are one prompt's, and for a rare preference all ties: no model ever formed; docs/LEARNING.md).
            spread = [hashlib.md5(f"{a}:{b}".encode()).digest() for a, b in zip(cands["a"], cands["b"])]
            k = spread.index(min(spread))
            r = cands.iloc[k]
            return {"prompt_id": int(r.prompt_id), "a": int(r.a), "b": int(r.b), "p": 0.5, "std": float("nan")}
        feats = self.features(list(cands["a"]) + list(cands["b"]))
        Xa = np.stack([feats[int(i)] for i in cands["a"]])
        Xb = np.stack([feats[int(i)] for i in cands["b"]])
        p, std = model.prob_chosen(Xa, Xb)
        # Most informative: a coin flip for the model and a wide posterior (BALD-like, cheap).
        value = (1 - np.abs(2 * p - 1)) * (1 + std)
        k = int(np.argmax(value))
        r = cands.iloc[k]
        return {"prompt_id": int(r.prompt_id), "a": int(r.a), "b": int(r.b), "p": float(p[k]), "std": float(std[k])}

    # -------------------------------------------------------------- deep tier
    def _maybe_train_deep(self) -> None:
        every = self.settings.deep_every
        if not every or self.deep_training():
            return
        n = int((~self.pairs()["heldout"]).sum())
        if n - self._deep_pairs_at_last >= every:
            self._deep_thread = threading.Thread(target=self._train_deep_safe, daemon=True, name="deep-reward")
            self._deep_thread.start()

    def _train_deep_safe(self, **config):
        try:
            return self.train_deep(**config)
        except Exception as e:
            self.last_error = f"deep training: {e}"
            log.warning("deep reward training failed: %s", e)
            return None

    def train_deep(self, **config) -> int | None:
        from rlhf_studio.components.reward.deep import DeepRewardConfig
        from .errors import StudioError
        pairs = self.pairs()
        train = pairs[~pairs["heldout"]]
        if len(train) < MIN_TRAIN:
            raise StudioError("no preference pairs to train on yet: compare, rank or rate completions first")
        self.refit_fast(store_weights=True)     # the deep head starts from the current probe
        seen: set = set()
        cfg = DeepRewardConfig(**{k: v for k, v in config.items() if k in DeepRewardConfig.__dataclass_fields__})
        parent = self.store.latest_reward_version("deep", with_weights=True)
        # warm start from the newest complete version when its adapter has the shape asked for; else a fresh
        # adapter that learns every pair (the parent stays in the lineage)
        warm = parent is not None and parent.get("weights") is not None and _same_shape(parent["config"], cfg)
        if warm:
            seen = set(json.loads(parent["pair_ids"]) if isinstance(parent["pair_ids"], str) else parent["pair_ids"] or [])
        keys = [f"{a}>{b}" for a, b in zip(train["chosen_id"], train["rejected_id"])]
        new_idx = [i for i, k in enumerate(keys) if k not in seen]
        old_idx = [i for i, k in enumerate(keys) if k in seen]
        rng = np.random.default_rng(len(keys))
        replay_idx = list(rng.permutation(old_idx)[: self.settings.deep_replay]) if old_idx else []
        prompts_c, texts_c = self.texts([int(i) for i in train["chosen_id"]])
        _, texts_r = self.texts([int(i) for i in train["rejected_id"]])
        margins = bt_margins(train["margin"].to_numpy(dtype=np.float32))
        as_tuples = lambda idx: [(prompts_c[i], texts_c[i], texts_r[i], float(margins[i])) for i in idx]  # noqa: E731
        # Each update is a run row: 'running' while it trains, so that a process killed mid-update leaves it
        # 'interrupted' at the next start (the version table only ever gets complete versions, in one commit;
        # the next update warm-starts from the newest of them and still counts the lost update's pairs as new).
        run_id = self.store.create_run("reward", {"tier": "deep", **cfg.__dict__}, {
            "parent_version": parent["id"] if parent is not None else None, "new_pairs": len(new_idx),
            "replayed_pairs": len(replay_idx), "warm_start": warm, "base_model": self.lm.model_id,
            "base_revision": self.revision})
        self.store.set_run_status(run_id, "running")
        try:
            vid = self._train_deep_run(cfg, parent, warm, seen, keys, new_idx, replay_idx, as_tuples, pairs)
        except BaseException as e:
            try:
                self.store.set_run_status(run_id, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            except Exception:   # the store is closing: the next start marks the run interrupted
                pass
            raise
        self.store.set_run_status(run_id, "cancelled" if self._stop.is_set() else "completed")
        return vid

    def _train_deep_run(self, cfg, parent, warm, seen, keys, new_idx, replay_idx, as_tuples, pairs) -> int:
        from rlhf_studio.components.reward.deep import DeepRewardTrainer
        # The head starts from the current fast-tier probe; a parent version warm-starts adapter and head.
        # (the service owns the "reward" adapter: another shape asked for replaces it; versions live in the DB)
        trainer = DeepRewardTrainer(self.lm, cfg, adapter_name="reward", probe=self.fast, replace_adapter=True)
        if warm:
            trainer.load_state_bytes(parent["weights"])
        t0 = time.perf_counter()
        train_metrics = trainer.train(as_tuples(new_idx or list(range(len(keys)))), as_tuples(replay_idx),
                                      stop=self._stop.is_set)
        seconds = time.perf_counter() - t0
        stopped = self._stop.is_set()
        test = pairs[pairs["heldout"]]
        metrics = {"heldout_pairs": len(test), "train_seconds": seconds, "new_pairs": len(new_idx), "warm_start": warm,
                   "replayed_pairs": len(replay_idx), **{f"train_{k}": v for k, v in (train_metrics or {}).items()
                                                         if isinstance(v, (int, float))}}
        if stopped:
            # The app is closing: keep what the update learned up to its last step, but do not hold the
            # shutdown for scoring the held-out pairs (minutes under load); the next version is scored.
            metrics.update(heldout_accuracy=None, heldout_loss=None,
                           note="stopped when the app closed: held-out pairs not scored")
        elif len(test):
            pc, tc = self.texts([int(i) for i in test["chosen_id"]])
            _, tr = self.texts([int(i) for i in test["rejected_id"]])
            from rlhf_studio.components.reward.bt import bt_loss
            import torch
            sc, sr = trainer.score(pc, tc), trainer.score(pc, tr)
            metrics.update(heldout_accuracy=float(np.mean(sc > sr)),
                           heldout_loss=float(bt_loss(torch.tensor(sc), torch.tensor(sr))))
            if len(test) < MIN_HELDOUT:
                metrics["note"] = f"only {len(test)} held-out pairs: accuracy is not meaningful yet"
        vid = self.store.add_reward_version(
            tier="deep", criterion=_criterion_key(self.settings.criterion),
            config={**cfg.__dict__, "model_revision": self.revision}, pair_ids=sorted(seen | set(keys)),
            labels_seen=self._labels_seen(), metrics=metrics, weights=trainer.state_bytes(),
            parent_id=parent["id"] if parent is not None else None)
        self.deep = trainer.model          # the adapter just trained, already on the shared base
        self.deep_version = vid
        self._deep_pairs_at_last = len(keys)
        return vid

    def train(self, tier: str = "deep", wait: bool = True, **config) -> int | None:
        from .errors import StudioError
        if tier not in ("fast", "deep"):
            raise StudioError("tier must be 'fast' or 'deep'")
        if tier == "fast" and config:       # silently ignoring them trained something else than asked
            raise StudioError(f"the fast tier takes no settings (got {', '.join(sorted(config))}); "
                              "the deep tier's are those of DeepRewardConfig")
        if tier == "deep":
            from rlhf_studio.components.reward.deep import DeepRewardConfig
            try:
                DeepRewardConfig.from_settings(config)
            except (ValueError, TypeError) as e:
                raise StudioError(str(e)) from None
        if len(self.pairs()) == 0:
            raise StudioError("no preference pairs yet: compare, rank or rate at least two completions of a prompt")
        if tier == "fast":
            vid = self.refit_fast(store_weights=True)
            if vid is None:
                raise StudioError("too few training pairs for a reward model yet (the held-out split keeps ~20%)")
            return vid
        if wait:
            return self.train_deep(**config)
        if self.deep_training():
            raise StudioError("a deep reward-model update is already running")
        self._deep_thread = threading.Thread(target=self._train_deep_safe, kwargs=config, daemon=True)
        self._deep_thread.start()
        return None

    # --------------------------------------------------------------- imports
    def import_preferences(self, path: str, format: str = "hh", compute_features: bool = True) -> int:
        n = import_preferences(self.store, path, format)
        if compute_features:
            self.start_feature_job()
        return n

    def start_feature_job(self) -> None:
        """Compute features of every completion that lacks them, in the background, with progress."""
        if self._feature_thread and self._feature_thread.is_alive():
            return
        def work():
            p = self.progress
            p.running, p.message = True, "computing reward features"
            try:
                ids = self.store.completion_ids_without_features(self.revision)
                p.done, p.total = 0, len(ids)
                def prog(d, t):
                    p.done, p.total = d, t
                self.features(ids, progress=prog, stop=self._stop.is_set)
                p.message = f"features ready for {len(ids)} completions"
                self.refit_fast(store_weights=True)
            except Exception as e:
                p.message = f"feature job failed: {e}"
                self.last_error = p.message
            finally:
                p.running = False
        self._feature_thread = threading.Thread(target=work, daemon=True, name="features")
        self._feature_thread.start()

    def wait_idle(self, timeout: float | None = None) -> None:
        for t in (self._feature_thread, self._deep_thread):
            if t is not None:
                t.join(timeout)

    def shutdown(self) -> None:
        self._stop.set()
        self.wait_idle(timeout=30)


def bt_margins(strength: np.ndarray) -> np.ndarray:
    """Both tiers' Bradley-Terry margins from the pairs view's `margin` column, which is a preference's
    strength: 1 for a plain one (pairwise, ranking, thumbs, rewrite), the star difference for stars (times the
    criterion's weight). A plain preference asks for no margin; only stronger ones push the two scores further
    apart (margin = strength - 1, never negative). So an imported or clicked A-over-B pair trains exactly as in
    bench/bench_reward.py, and 5 stars vs 1 star asks for a gap of 3."""
    return np.maximum(np.asarray(strength, dtype=np.float32) - 1.0, 0.0)


def _same_shape(parent_config, cfg) -> bool:
    """Whether a parent version's adapter can warm-start one with config `cfg` (same LoRA shape)."""
    d = json.loads(parent_config) if isinstance(parent_config, str) else dict(parent_config or {})
    return all(d.get(k) == getattr(cfg, k) for k in ("lora_r", "lora_alpha", "lora_layers", "lora_dropout"))


def _criterion_key(c) -> str:
    return c if isinstance(c, str) else json.dumps(c, sort_keys=True)


def _conflicts(pairs) -> int:
    """Unordered pairs that appear in both directions (as Store.pair_conflicts, from the pairs already read)."""
    if len(pairs) == 0:
        return 0
    return int((pairs.groupby("pair_key")["chosen_id"].nunique() > 1).sum())


def _digest(keys) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()


def _jsonable(x):
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
