"""Reward model versions and the feature vectors cached for the fast tier."""

from __future__ import annotations

import json
import threading
from typing import Any, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd

from . import db
from .base import StoreBase
from .errors import InvalidInput, NotFound, StorageError, short
from .labels import criteria_weights
from .validate import as_bytes, as_ids, as_int, as_str, criterion_name

TIERS = ("fast", "deep")


class RewardModels(StoreBase):
    """Feature cache and reward model versions."""

    # ------------------------------------------------------------ features cache
    def put_features(self, model_revision: str, completion_ids: Sequence[int], vectors) -> None:
        rev = as_str(model_revision, "model_revision")
        ids = as_ids(completion_ids, "completion id")
        vecs = [np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors]
        if len(vecs) != len(ids):
            raise InvalidInput(f"{len(ids)} completion ids but {len(vecs)} vectors.")
        if len(set(ids)) != len(ids):
            raise InvalidInput("completion_ids contains duplicates.")
        if not ids:
            return
        if any(not np.isfinite(v).all() for v in vecs):
            raise InvalidInput("Feature vectors must not contain NaN or infinity.")

        def fn(cur):
            found = {r[0] for r in db.rows(cur, "SELECT id FROM completions WHERE id IN (SELECT unnest(?::BIGINT[]))",
                                           [ids])}
            if len(found) != len(ids):
                raise NotFound(f"no completion with id {min(set(ids) - found)}")
            name = f"_storage_vec_{threading.get_ident()}"
            cur.register(name, pd.DataFrame({"completion_id": pd.Series(ids, dtype="int64"),
                                             "vec": pd.Series(vecs, dtype=object)}))
            try:
                cur.execute(f"INSERT OR REPLACE INTO features (model_revision, completion_id, vec) "
                            f"SELECT ?, completion_id, vec::FLOAT[] FROM {name}", [rev]).fetchall()
            finally:
                cur.unregister(name)

        self._write(fn, "the features", lambda cur, _: db.scalar(
            cur, "SELECT count(*) FROM features WHERE model_revision = ? AND completion_id IN "
                 "(SELECT unnest(?::BIGINT[]))", [rev, ids]) == len(ids))

    def get_features(self, model_revision: str, completion_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Cached vectors (float32) for those of the ids that have one."""
        ids = as_ids(completion_ids, "completion id")
        if not ids:
            return {}
        try:
            res = self._cur().execute(
                "SELECT completion_id, vec FROM features WHERE model_revision = ? AND completion_id IN "
                "(SELECT unnest(?::BIGINT[]))", [as_str(model_revision, "model_revision"), ids]).fetchnumpy()
        except duckdb.Error as e:
            raise StorageError(f"Reading the database failed: {short(e)}") from None
        return {int(c): np.asarray(v, dtype=np.float32) for c, v in zip(res["completion_id"], res["vec"])}

    # ------------------------------------------------------------ reward model versions
    def add_reward_version(self, tier: str, criterion: str | Mapping[str, float], config: Mapping[str, Any],
                           pair_ids: Sequence[Any], labels_seen: int, metrics: Mapping[str, Any],
                           weights: bytes | None, parent_id: int | None = None) -> int:
        if tier not in TIERS:
            raise InvalidInput(f"tier must be one of {', '.join(TIERS)}, got {tier!r}.")
        if isinstance(criterion, Mapping):
            criteria_weights(criterion)
            crit = json.dumps(db.jsonable(dict(criterion)), sort_keys=True)
        else:
            crit = criterion_name(criterion)
        values = [tier, as_int(parent_id, "parent_id", optional=True), crit, db.to_json(dict(config or {})),
                  db.to_json(list(pair_ids)), as_int(labels_seen, "labels_seen", minimum=0),
                  db.to_json(dict(metrics or {})), None if weights is None else as_bytes(weights, "weights")]

        def fn(cur):
            if values[1] is not None and not db.rows(cur, "SELECT 1 FROM reward_versions WHERE id = ?", [values[1]]):
                raise NotFound(f"no reward model version with id {values[1]}")
            return cur.execute(
                "INSERT INTO reward_versions (id, tier, parent_id, criterion, config, pair_ids, labels_seen, "
                "metrics, weights) VALUES (nextval('reward_version_id_seq'), ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                values).fetchall()[0][0]

        return self._write(fn, "the reward model version",
                           lambda cur, vid: db.count_ids(cur, "reward_versions", [vid]) == 1)

    def latest_reward_version(self, tier: str, with_weights: bool = True) -> dict | None:
        """The newest version of a tier (that has stored weights, if with_weights), or None."""
        cond = " AND weights IS NOT NULL" if with_weights else ""
        df = self._df(f"SELECT id FROM reward_versions WHERE tier = ?{cond} ORDER BY id DESC LIMIT 1", [tier])
        return None if df.empty else self.reward_version(int(df["id"].iloc[0]))

    def reward_versions(self) -> pd.DataFrame:
        df = self._df("SELECT id, tier, parent_id, criterion, config, pair_ids, labels_seen, metrics, "
                      "octet_length(weights) AS weights_bytes, created_at FROM reward_versions ORDER BY id")
        return db.parse_json_cols(df, ["config", "pair_ids", "metrics"])

    def reward_version(self, version_id: int) -> dict:
        vid = as_int(version_id, "version id")
        df = self._df("SELECT * FROM reward_versions WHERE id = ?", [vid])
        if df.empty:
            raise NotFound(f"no reward model version with id {vid}")
        rec = db.records(db.parse_json_cols(df, ["config", "pair_ids", "metrics"]))[0]
        # automatic fast refits keep their metrics but not always their weights (migration 2)
        rec["weights"] = None if rec["weights"] is None else bytes(rec["weights"])
        return rec

    def reward_metrics(self) -> pd.DataFrame:
        """One row per version: version, tier, criterion, labels_seen, heldout_accuracy, heldout_loss,
        heldout_pairs, the other metrics (nested keys flattened as 'a.b'), created_at."""
        df = self._df("SELECT id AS version, tier, criterion, labels_seen, metrics, created_at "
                      "FROM reward_versions ORDER BY id")
        metrics = pd.json_normalize([db.from_json(m) or {} for m in df["metrics"]], sep=".")
        metrics.index = df.index
        base = df.drop(columns=["metrics", "created_at"])
        for col in ("heldout_accuracy", "heldout_loss", "heldout_pairs"):
            if col not in metrics.columns:
                metrics[col] = np.nan
        metrics = metrics.drop(columns=[c for c in metrics.columns if c in base.columns])
        first = ["heldout_accuracy", "heldout_loss", "heldout_pairs"]
        metrics = metrics[first + sorted(c for c in metrics.columns if c not in first)]
        return pd.concat([base, metrics, df[["created_at"]]], axis=1)

    def completion_ids_without_features(self, model_revision: str) -> list[int]:
        df = self._df("SELECT id FROM completions WHERE id NOT IN (SELECT completion_id FROM features "
                      "WHERE model_revision = ?) ORDER BY id", [as_str(model_revision, "model_revision")])
        return [int(i) for i in df["id"]]
