"""StoreBase: one open database file as the aggregates see it (lifecycle, reads, the write path, backups)."""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import duckdb
import pandas as pd

from . import db
from .errors import InvalidInput, StorageError, short
from .integrity import MEMORY
from .writer import open_writer, release_writer

TABLES = ("prompts", "completions", "criteria", "feedback", "features", "reward_versions", "runs",
          "run_metrics", "run_samples", "adapters", "checkpoints", "retractions", "heldout_prompts", "evaluations",
          "evaluation_pairs", "watch_checks", "watch_judges")


class StoreBase:
    """The lifecycle, reads and write path of one database file, shared by the aggregates (see storage.store)."""

    def __init__(self, path: str | os.PathLike = MEMORY, read_only: bool = False):
        self._core = open_writer(path, read_only)
        self.path: str = self._core.path
        self.read_only: bool = bool(read_only or self._core.read_only)
        self._closed = False
        self._close_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        release_writer(self._core)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.read_only else "read-write")
        return f"Store({self.path!r}, {state})"

    # ------------------------------------------------------------ plumbing
    def _cur(self):
        if self._closed:
            raise StorageError(f"The database {self.path} is closed.")
        return self._core.cursor()

    def _df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        try:
            return self._cur().execute(sql, params or []).df()
        except duckdb.Error as e:
            raise StorageError(f"Reading the database failed: {short(e)}") from None

    def _rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        try:
            return db.rows(self._cur(), sql, params)
        except duckdb.Error as e:
            raise StorageError(f"Reading the database failed: {short(e)}") from None

    def _write(self, fn, what: str, check=None, transaction: bool = True):
        if self._closed:
            raise StorageError(f"The database {self.path} is closed; {what} was not saved.")
        if self.read_only:
            raise StorageError(f"The database {self.path} is open read-only; {what} was not saved.")
        return self._core.write(fn, what, check, transaction)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query (e.g. on the views) and return a DataFrame. Never write through this."""
        return self._df(sql, params)

    def query_rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """As `query`, as a list of tuples (for small results read row by row)."""
        return self._rows(sql, params)

    def read_cursor(self):
        """This thread's read cursor, for storage modules that stream a query (e.g. COPY ... TO a file)."""
        return self._cur()

    def write_transaction(self, fn, what: str, check=None):
        """For storage modules (bulk writers): run fn(cursor) on the writer thread in one transaction; after
        COMMIT, check(cursor, result) must be true (the write is read back). Returns fn's result. `what` names
        the change in error messages ("the rated completions from ...")."""
        return self._write(fn, what, check)

    def schema_version(self) -> int:
        return int(self._rows("SELECT max(version) FROM schema_version")[0][0])

    @property
    def warnings(self) -> list[str]:
        """Start-up warnings (a write-ahead log moved aside, a damaged free block), for the UI."""
        return list(self._core.warnings)

    # ------------------------------------------------------------ whole database
    def backup(self, path: str | os.PathLike) -> str:
        """Write a consistent snapshot of the whole database to a new file (runs on the writer thread, so no
        write is half in it). The file opens with Store(path). Returns its absolute path."""
        target = os.path.realpath(os.path.expanduser(os.fspath(path)))
        if target == self.path:
            raise InvalidInput("The backup file must differ from the database file.")
        if not os.path.isdir(os.path.dirname(target)):
            raise InvalidInput(f"Cannot write the backup {target}: the folder does not exist.")
        if os.path.exists(target):
            raise InvalidInput(f"The backup file {target} already exists; choose a new name.")
        tmp = target + ".partial"

        def fn(cur):
            for p in (tmp, tmp + ".wal"):
                if os.path.exists(p):
                    os.remove(p)
            src = db.scalar(cur, "SELECT current_database()")
            cur.execute("ATTACH ? AS storage_backup", [tmp]).fetchall()
            try:
                cur.execute("BEGIN TRANSACTION")
                try:
                    cur.execute(f'COPY FROM DATABASE "{src}" TO storage_backup').fetchall()
                    cur.execute("COMMIT")
                except BaseException:
                    try:
                        cur.execute("ROLLBACK")
                    except duckdb.Error:
                        pass
                    raise
            finally:
                cur.execute("DETACH storage_backup").fetchall()
            os.replace(tmp, target)
            return target

        def check(cur, _):
            n = {t: db.scalar(cur, f"SELECT count(*) FROM {t}") for t in TABLES}
            con = duckdb.connect(target, read_only=True)
            try:
                return all(db.scalar(con, f"SELECT count(*) FROM {t}") == c for t, c in n.items())
            finally:
                con.close()

        try:
            return self._write(fn, f"the backup {target}", check, transaction=False)
        except BaseException:
            for p in (tmp, tmp + ".wal"):
                if os.path.exists(p):
                    os.remove(p)
            raise

    def stats(self) -> dict[str, int]:
        """Row counts per table."""
        q = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in TABLES)
        return {t: int(n) for t, n in self._rows(q)}
