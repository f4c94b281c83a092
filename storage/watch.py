"""The reward-hacking watch's checks of a PPO run and its second judge (migration 6; studio/watch.py).

A run's status cannot take a new value (DuckDB cannot change the CHECK on `runs.status`): a paused run is stored
'cancelled' and reads as paused while its pause is its newest status change (`paused_at` = `runs.updated_at`)."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from . import db
from .errors import InvalidInput
from .migrations import NOW
from .runs import Runs
from .validate import as_bytes, as_int, as_str


class WatchChecks(Runs):
    """Watch checks (signals, verdict, examples, the best policy so far) and each run's second judge."""

    def add_watch_check(self, run_id: int, step: int, verdict: str, reason: str | None, signals: Mapping[str, Any],
                        examples: Mapping[str, Any] | None = None, best: bool = False,
                        adapter: bytes | None = None) -> int:
        """Store one watch check of a PPO run. With `adapter` (the policy at a new best check), that adapter is
        kept on this row and dropped from the run's older rows, in the same transaction."""
        rid, step = as_int(run_id, "run_id"), as_int(step, "step", minimum=0)
        if verdict not in ("ok", "pause"):
            raise InvalidInput(f"watch verdict must be 'ok' or 'pause', got {verdict!r}.")
        if not isinstance(signals, Mapping):
            raise InvalidInput("watch signals must be a dict {name: value}.")
        blob = None if adapter is None else as_bytes(adapter, "adapter")
        values = [rid, step, verdict, as_str(reason, "reason", optional=True, nonempty=False),
                  db.to_json(dict(signals)), db.to_json(dict(examples or {})), bool(best), blob]

        def fn(cur):
            self._require_run(cur, rid)
            if blob is not None:
                cur.execute("UPDATE watch_checks SET adapter = NULL WHERE run_id = ? AND adapter IS NOT NULL",
                            [rid]).fetchall()
            return cur.execute("INSERT INTO watch_checks (id, run_id, step, verdict, reason, signals, examples, "
                               "best, adapter) VALUES (nextval('watch_check_id_seq'), ?, ?, ?, ?, ?, ?, ?, ?) "
                               "RETURNING id", values).fetchall()[0][0]

        return self._write(fn, f"a watch check of run {rid}", lambda cur, cid: db.scalar(
            cur, "SELECT count(*) FROM watch_checks WHERE id = ? AND octet_length(adapter) IS NOT DISTINCT FROM ?",
            [cid, None if blob is None else len(blob)]) == 1)

    def watch_checks(self, run_id: int) -> pd.DataFrame:
        """One row per check, oldest first: id, step, verdict, reason, best, has_adapter, paused_at, created_at,
        examples (dict) and every signal as its own column."""
        df = self._df("SELECT id, step, verdict, reason, best, adapter IS NOT NULL AS has_adapter, paused_at, "
                      "created_at, signals, examples FROM watch_checks WHERE run_id = ? ORDER BY id",
                      [as_int(run_id, "run_id")])
        sig = pd.DataFrame([db.from_json(s) or {} for s in df["signals"]], index=df.index)
        df = db.parse_json_cols(df.drop(columns=["signals"]), ["examples"])
        return pd.concat([df, sig.drop(columns=[c for c in sig.columns if c in df.columns])], axis=1)

    def watch_best_adapter(self, run_id: int) -> tuple[int, bytes] | None:
        """(step, adapter bytes) of the run's best check so far, or None."""
        rows = self._rows("SELECT step, adapter FROM watch_checks WHERE run_id = ? AND adapter IS NOT NULL "
                          "ORDER BY id DESC LIMIT 1", [as_int(run_id, "run_id")])
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def pause_run(self, run_id: int) -> None:
        """The watch paused the run: stored as 'cancelled' (resumable), its newest 'pause' check marked with the
        same timestamp, in one transaction; `run_pause` reads it back while nothing changed the run since."""
        rid = as_int(run_id, "run_id")

        def fn(cur):
            self._require_run(cur, rid)
            cid = db.scalar(cur, "SELECT max(id) FROM watch_checks WHERE run_id = ? AND verdict = 'pause'", [rid])
            if cid is None:
                raise InvalidInput(f"run {rid} has no watch check that asked for a pause.")
            cur.execute(f"UPDATE runs SET status = 'cancelled', error = NULL, updated_at = {NOW} WHERE id = ?",
                        [rid]).fetchall()
            cur.execute(f"UPDATE watch_checks SET paused_at = {NOW} WHERE id = ?", [cid]).fetchall()

        self._write(fn, f"the pause of run {rid}", lambda cur, _: self._pause_of(cur, rid) is not None)

    @staticmethod
    def _pause_of(cur, rid: int):
        rows = db.rows(cur, "SELECT w.id FROM watch_checks w JOIN runs r ON r.id = w.run_id WHERE w.run_id = ? "
                          "AND r.status = 'cancelled' AND w.paused_at IS NOT NULL AND w.paused_at >= r.updated_at "
                          "ORDER BY w.id DESC LIMIT 1", [rid])
        return rows[0][0] if rows else None

    def run_pause(self, run_id: int) -> dict | None:
        """The watch check that paused this run, while that pause is the run's newest status (a resume, a
        cancel or a completion ends it); None otherwise."""
        rid = as_int(run_id, "run_id")
        cid = self._pause_of(self._cur(), rid)
        if cid is None:
            return None
        df = self.watch_checks(rid)
        return db.records(df[df["id"] == cid])[0]

    def paused_run_ids(self) -> list[int]:
        """Runs whose newest status change is a pause by the watch."""
        return [int(r[0]) for r in self._rows(
            "SELECT DISTINCT w.run_id FROM watch_checks w JOIN runs r ON r.id = w.run_id WHERE r.status = "
            "'cancelled' AND w.paused_at IS NOT NULL AND w.paused_at >= r.updated_at ORDER BY 1")]

    def put_watch_judge(self, run_id: int, weights: bytes, pairs: int) -> None:
        """The run's second judge (written once; a resumed run reads it back)."""
        rid, blob, n = as_int(run_id, "run_id"), as_bytes(weights, "weights"), as_int(pairs, "pairs", minimum=0)

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute("INSERT OR REPLACE INTO watch_judges (run_id, weights, pairs) VALUES (?, ?, ?)",
                        [rid, blob, n]).fetchall()

        self._write(fn, f"the second judge of run {rid}", lambda cur, _: db.scalar(
            cur, "SELECT octet_length(weights) FROM watch_judges WHERE run_id = ?", [rid]) == len(blob))

    def watch_judge(self, run_id: int) -> tuple[bytes, int] | None:
        rows = self._rows("SELECT weights, pairs FROM watch_judges WHERE run_id = ?", [as_int(run_id, "run_id")])
        return (bytes(rows[0][0]), int(rows[0][1])) if rows else None
