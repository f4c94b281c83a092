"""Training runs and what they produce: status, notes, metrics, sample rollouts, checkpoints, adapters."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from . import db
from .base import StoreBase
from .errors import InvalidInput, NotFound
from .migrations import NOW
from .validate import as_bytes, as_float, as_int, as_str

RUN_KINDS = ("ppo", "reward")
RUN_STATUSES = ("queued", "running", "completed", "cancelled", "failed", "interrupted")
CHECKPOINTS_KEPT = 2


class Runs(StoreBase):
    """Runs, their metrics and samples, checkpoints and adapters."""

    # ------------------------------------------------------------ runs
    def create_run(self, kind: str, config: Mapping[str, Any] | None = None,
                   lineage: Mapping[str, Any] | None = None) -> int:
        if kind not in RUN_KINDS:
            raise InvalidInput(f"run kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}.")
        values = [kind, db.to_json(dict(config or {})), db.to_json(dict(lineage or {}))]
        return self._write(
            lambda cur: cur.execute("INSERT INTO runs (id, kind, status, config, lineage) VALUES "
                                    "(nextval('run_id_seq'), ?, 'queued', ?, ?) RETURNING id", values).fetchall()[0][0],
            "the run", lambda cur, rid: db.count_ids(cur, "runs", [rid]) == 1)

    def _require_run(self, cur, run_id: int) -> None:
        if not db.rows(cur, "SELECT 1 FROM runs WHERE id = ?", [run_id]):
            raise NotFound(f"no run with id {run_id}")

    def set_run_status(self, run_id: int, status: str, error: str | None = None) -> None:
        rid = as_int(run_id, "run_id")
        if status not in RUN_STATUSES:
            raise InvalidInput(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}.")
        error = as_str(error, "error", optional=True, nonempty=False)

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute(f"UPDATE runs SET status = ?, error = ?, updated_at = {NOW} WHERE id = ?",
                        [status, error, rid]).fetchall()

        self._write(fn, f"the status of run {rid}", lambda cur, _: db.scalar(
            cur, "SELECT count(*) FROM runs WHERE id = ? AND status = ? AND error IS NOT DISTINCT FROM ?",
            [rid, status, error]) == 1)

    def add_run_note(self, run_id: int, note: str) -> None:
        """Append a line to the run's notes (what it did differently from its config and went on); a note it
        already has is not added again (a resumed run may say the same thing)."""
        rid = as_int(run_id, "run_id")
        note = " ".join(as_str(note, "note").split())     # one line, as the notes are read line by line

        has_note = "list_contains(string_split(coalesce(notes, ''), chr(10)), ?)"   # as a whole line

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute(f"UPDATE runs SET notes = CASE WHEN notes IS NULL THEN ? ELSE notes || chr(10) || ? END, "
                        f"updated_at = {NOW} WHERE id = ? AND NOT {has_note}", [note, note, rid, note]).fetchall()

        self._write(fn, f"a note on run {rid}", lambda cur, _: db.scalar(
            cur, f"SELECT count(*) FROM runs WHERE id = ? AND {has_note}", [rid, note]) == 1)

    def mark_running_interrupted(self) -> int:
        """Runs left 'running' or 'queued' by a previous process become 'interrupted'. Returns how many."""
        def fn(cur):
            # no UPDATE ... RETURNING: DuckDB turns it into delete+insert, which the foreign keys that
            # reference runs (metrics, checkpoints, ...) refuse
            ids = [r[0] for r in db.rows(cur, "SELECT id FROM runs WHERE status IN ('running', 'queued')")]
            if ids:
                cur.execute(f"UPDATE runs SET status = 'interrupted', updated_at = {NOW} "
                            "WHERE id IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall()
            return ids

        ids = self._write(fn, "the interrupted runs", lambda cur, ids: not ids or db.scalar(
            cur, "SELECT count(*) FROM runs WHERE status = 'interrupted' AND id IN (SELECT unnest(?::BIGINT[]))",
            [ids]) == len(ids))
        return len(ids)

    def runs(self) -> pd.DataFrame:
        return db.parse_json_cols(self._df("SELECT * FROM runs ORDER BY id"), ["config", "lineage"])

    def run(self, run_id: int) -> dict:
        rid = as_int(run_id, "run_id")
        df = self._df("SELECT * FROM runs WHERE id = ?", [rid])
        if df.empty:
            raise NotFound(f"no run with id {rid}")
        return db.records(db.parse_json_cols(df, ["config", "lineage"]))[0]

    def add_run_metrics(self, run_id: int, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one step (a metric written again for the same step replaces the old value)."""
        rid, step = as_int(run_id, "run_id"), as_int(step, "step", minimum=0)
        if not isinstance(metrics, Mapping):
            raise InvalidInput("metrics must be a dict {name: value}.")
        metrics = {k: v for k, v in metrics.items() if k != "step"}   # the step is the row key already
        names = [as_str(k, "metric name") for k in metrics]
        values = [as_float(v, f"metric {k!r}", optional=True) for k, v in metrics.items()]
        if not names:
            return

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute("INSERT OR REPLACE INTO run_metrics (run_id, step, name, value) "
                        "SELECT ?, ?, unnest(?::VARCHAR[]), unnest(?::DOUBLE[])", [rid, step, names, values]).fetchall()

        self._write(fn, f"the metrics of run {rid}", lambda cur, _: db.scalar(
            cur, "SELECT count(*) FROM run_metrics WHERE run_id = ? AND step = ? AND name IN "
                 "(SELECT unnest(?::VARCHAR[]))", [rid, step, names]) == len(set(names)))

    def run_metrics(self, run_id: int) -> pd.DataFrame:
        """Wide: one row per step, column `step` plus one column per metric name."""
        df = self._df("SELECT step, name, value FROM run_metrics WHERE run_id = ? ORDER BY step, name",
                      [as_int(run_id, "run_id")])
        if df.empty:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        wide = df.pivot(index="step", columns="name", values="value").reset_index()
        wide.columns.name = None
        return wide

    def add_run_samples(self, run_id: int, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Sample rollouts of a step: rows of {prompt, response, reward}."""
        rid, step = as_int(run_id, "run_id"), as_int(step, "step", minimum=0)
        prompts, responses, rewards = [], [], []
        for i, r in enumerate(rows, 1):
            if not isinstance(r, Mapping):
                raise InvalidInput(f"Sample {i} must be a dict with prompt, response and reward.")
            prompts.append(as_str(r.get("prompt"), f"sample {i}: prompt", nonempty=False))
            responses.append(as_str(r.get("response"), f"sample {i}: response", nonempty=False))
            rewards.append(as_float(r.get("reward"), f"sample {i}: reward", optional=True))
        if not prompts:
            return

        def fn(cur):
            self._require_run(cur, rid)
            start = db.scalar(cur, "SELECT coalesce(max(idx) + 1, 0) FROM run_samples WHERE run_id = ? AND step = ?",
                              [rid, step])
            cur.execute("INSERT INTO run_samples (run_id, step, idx, prompt, response, reward) "
                        "SELECT ?, ?, ? + unnest(range(?)), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), "
                        "unnest(?::DOUBLE[])", [rid, step, start, len(prompts), prompts, responses, rewards]).fetchall()
            return start

        self._write(fn, f"the samples of run {rid}", lambda cur, start: db.scalar(
            cur, "SELECT count(*) FROM run_samples WHERE run_id = ? AND step = ? AND idx >= ?",
            [rid, step, start]) == len(prompts))

    def run_samples(self, run_id: int) -> pd.DataFrame:
        return self._df("SELECT step, idx, prompt, response, reward FROM run_samples WHERE run_id = ? "
                        "ORDER BY step, idx", [as_int(run_id, "run_id")])

    # ------------------------------------------------------------ checkpoints
    def put_checkpoint(self, run_id: int, step: int, state: bytes) -> None:
        """Save a complete training checkpoint (one transaction); only the newest 2 steps per run are kept."""
        rid, step, state = as_int(run_id, "run_id"), as_int(step, "step", minimum=0), as_bytes(state, "state")

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute("INSERT OR REPLACE INTO checkpoints (run_id, step, state) VALUES (?, ?, ?)",
                        [rid, step, state]).fetchall()
            cur.execute("DELETE FROM checkpoints WHERE run_id = ? AND step NOT IN "
                        "(SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step DESC LIMIT ?)",
                        [rid, rid, CHECKPOINTS_KEPT]).fetchall()

        def check(cur, _):
            steps = [r[0] for r in db.rows(cur, "SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step DESC",
                                           [rid])]
            if len(steps) >= CHECKPOINTS_KEPT and step < steps[-1]:
                return True  # an older step than the kept ones: pruned at once by design
            return db.scalar(cur, "SELECT octet_length(state) FROM checkpoints WHERE run_id = ? AND step = ?",
                             [rid, step]) == len(state)

        self._write(fn, f"the checkpoint of run {rid} at step {step}", check)

    def latest_checkpoint(self, run_id: int) -> tuple[int, bytes] | None:
        rows = self._rows("SELECT step, state FROM checkpoints WHERE run_id = ? ORDER BY step DESC LIMIT 1",
                          [as_int(run_id, "run_id")])
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def checkpoints(self, run_id: int) -> pd.DataFrame:
        return self._df("SELECT run_id, step, octet_length(state) AS state_bytes, created_at FROM checkpoints "
                        "WHERE run_id = ? ORDER BY step", [as_int(run_id, "run_id")])

    # ------------------------------------------------------------ adapters
    def add_adapter(self, name: str, weights: bytes, config: Mapping[str, Any] | None, base_model_id: str,
                    base_revision: str | None = None, run_id: int | None = None, step: int | None = None) -> int:
        values = [as_int(run_id, "run_id", optional=True), as_str(name, "name").strip(),
                  as_int(step, "step", optional=True, minimum=0), as_str(base_model_id, "base_model_id"),
                  as_str(base_revision, "base_revision", optional=True), db.to_json(dict(config or {})),
                  as_bytes(weights, "weights")]

        def fn(cur):
            if values[0] is not None:
                self._require_run(cur, values[0])
            return cur.execute("INSERT INTO adapters (id, run_id, name, step, base_model_id, base_revision, config, "
                               "weights) VALUES (nextval('adapter_id_seq'), ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                               values).fetchall()[0][0]

        return self._write(fn, f"the adapter {values[1]!r}", lambda cur, aid: db.count_ids(cur, "adapters", [aid]) == 1)

    def adapters(self) -> pd.DataFrame:
        df = self._df("SELECT id, run_id, name, step, base_model_id, base_revision, config, "
                      "octet_length(weights) AS weights_bytes, created_at FROM adapters ORDER BY id")
        return db.parse_json_cols(df, ["config"])

    def adapter(self, adapter_id: int) -> dict:
        aid = as_int(adapter_id, "adapter id")
        df = self._df("SELECT * FROM adapters WHERE id = ?", [aid])
        if df.empty:
            raise NotFound(f"no adapter with id {aid}")
        rec = db.records(db.parse_json_cols(df, ["config"]))[0]
        rec["weights"] = bytes(rec["weights"])
        return rec
