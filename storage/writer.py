"""The shared part of an open database: one DuckDB connection, one writer thread, per-thread read cursors.

A process-wide registry keyed by the file's realpath shares one `Writer` between all `Store` objects opened on the
same file (DuckDB refuses a second read-write instance of a file, and one writer thread must own all writes).

DuckDB 2 notes: a Python connection is not thread-safe, so every thread reads through its own `cursor()`;
a result that was not fetched to the end blocks further work on that connection, so every query here is
fetched completely (`fetchall()` / `df()`).

Opening runs the start-up checks of `storage.integrity` (write-ahead log quarantine, block checksums).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import duckdb

from . import migrations
from .errors import RESTORE_ADVICE, InvalidInput, StorageError, short
from .integrity import MEMORY, connect, verify_file

QUEUE_SIZE = 1000
BUSY_TIMEOUT_S = 30.0

_REGISTRY: dict[str, "Writer"] = {}
_REGISTRY_LOCK = threading.RLock()


def translate(exc: BaseException, what: str = "the change") -> BaseException:
    """Map a DuckDB exception to one of ours; our own and non-database exceptions pass unchanged."""
    if isinstance(exc, StorageError) or not isinstance(exc, duckdb.Error):
        return exc
    msg = str(exc)
    if "Corrupt database file" in msg or "Corrupt WAL file" in msg:
        new: StorageError = StorageError(f"{what} was not saved: the database file is damaged ({short(exc, 200)}). "
                                         + RESTORE_ADVICE)
    elif "database has been invalidated" in msg:
        new = StorageError(f"{what} was not saved: an earlier fatal database error stopped all writes "
                           f"({short(exc, 200)}). Restart RLHF Studio; if the error comes back: " + RESTORE_ADVICE)
    elif "No space left on device" in msg or "File too large" in msg or "Disk quota exceeded" in msg:
        new = StorageError(f"{what} was not saved: the disk is full ({short(exc, 200)}). Free some disk space and "
                           "try again; everything saved before is intact.")
    elif "cannot encode str as UTF-8" in msg:
        new = InvalidInput(f"{what} was not saved: the text contains a character that is not valid Unicode "
                           f"({short(exc, 200)}). Remove it and try again.")
    elif isinstance(exc, duckdb.ConstraintException):
        new = InvalidInput(f"The database rejected {what}: {short(exc)}")
    elif isinstance(exc, duckdb.TransactionException):
        new = StorageError(f"{what} was not saved: the database aborted the transaction ({short(exc)}). "
                           "Please try again.")
    else:
        new = StorageError(f"Database error while saving {what}: {short(exc)}")
    new.__cause__ = exc
    return new


class Writer:
    """One open database file: the connection, the write queue and its thread, the read cursors."""

    def __init__(self, path: str, read_only: bool):
        self.path = path
        self.read_only = read_only
        self.refs = 1
        self.closed = False
        self._closing = False
        self._local = threading.local()
        self._cursors: list[tuple[threading.Thread, Any]] = []
        self._cursor_lock = threading.Lock()
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._writer_ident: int | None = None
        self._writer_cur = None
        self._thread: threading.Thread | None = None

        self.con, quarantined = connect(path, read_only)
        self.warnings: list[str] = [msg for msg, _ in quarantined]
        try:
            if path != MEMORY:
                self.warnings += verify_file(self.con, path)
            self._check_schema()
            lost = sum(n for _, n in quarantined)
            if lost and not read_only:
                self._skip_ids(lost)
        except BaseException:
            self.con.close()
            raise
        if not read_only:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._writer_main, args=(ready,),
                                            name=f"storage-writer:{os.path.basename(path)}", daemon=True)
            self._thread.start()
            ready.wait()

    # ---------------------------------------------------------------- schema
    def _check_schema(self) -> None:
        cur = self.con.cursor()
        try:
            try:
                version = migrations.current_version(cur)
            except duckdb.Error as e:
                raise StorageError(f"Cannot read the database {self.path}: {short(e)}") from None
            if version > migrations.LATEST_VERSION:
                raise StorageError(
                    f"The database {self.path} was written by a newer RLHF Studio (schema version {version}, "
                    f"this one knows up to {migrations.LATEST_VERSION}). Upgrade RLHF Studio.")
            if version < migrations.LATEST_VERSION:
                if self.read_only:
                    raise StorageError(
                        f"The database {self.path} needs an upgrade (schema version {version}); open it "
                        "read-write once to migrate it.")
                try:
                    migrations.migrate(cur)
                except duckdb.Error as e:
                    raise StorageError(f"Cannot set up the database schema in {self.path}: {short(e)}") from None
        finally:
            cur.close()

    def _skip_ids(self, lost_bytes: int) -> None:
        """After a quarantined write-ahead log, move every id sequence past any id its unreplayed part may have
        handed out, so that no id acknowledged before the crash is ever given to a different row. A row id takes
        at least 8 bytes of log, so lost_bytes // 8 + 1 is enough."""
        gap = int(lost_bytes) // 8 + 1
        cur = self.con.cursor()
        try:
            for (name,) in cur.execute("SELECT sequence_name FROM duckdb_sequences() WHERE database_name = "
                                       "current_database() AND schema_name = 'main'").fetchall():
                cur.execute(f'SELECT max(nextval(\'"{name}"\')) FROM range(?)', [gap]).fetchall()
        except duckdb.Error as e:
            raise StorageError(f"Cannot prepare the database {self.path} after moving its write-ahead log aside: "
                               f"{short(e)}") from None
        finally:
            cur.close()

    # ---------------------------------------------------------------- reads
    def cursor(self):
        """This thread's own cursor (DuckDB connections are not thread-safe)."""
        if self.closed:
            raise StorageError(f"The database {self.path} is closed.")
        cur = getattr(self._local, "cur", None)
        if cur is None:
            with self._cursor_lock:
                # close the cursors of threads that have ended (thread pools come and go)
                alive = []
                for thread, c in self._cursors:
                    if thread.is_alive():
                        alive.append((thread, c))
                    else:
                        try:
                            c.close()
                        except Exception:
                            pass
                self._cursors = alive
                cur = self.con.cursor()
                self._cursors.append((threading.current_thread(), cur))
            self._local.cur = cur
        return cur

    # ---------------------------------------------------------------- writes
    def in_writer(self) -> bool:
        return threading.get_ident() == self._writer_ident

    def write(self, fn: Callable[[Any], Any], what: str, check: Callable[[Any, Any], bool] | None = None,
              transaction: bool = True) -> Any:
        """Run fn(cursor) on the writer thread inside BEGIN/COMMIT, then check(cursor, result) after COMMIT.

        Returns fn's result once committed and verified. Called from the writer thread itself (a write inside
        a write), fn simply runs inside the current transaction.
        """
        if self.read_only:
            raise StorageError(f"The database {self.path} is open read-only; {what} cannot be saved.")
        if self.in_writer():
            return fn(self._writer_cur)
        if self._closing or self.closed:
            raise StorageError(f"The database {self.path} is closed; {what} was not saved.")
        fut: Future = Future()
        try:
            self._q.put((fn, what, check, transaction, fut), timeout=BUSY_TIMEOUT_S)
        except queue.Full:
            raise StorageError(f"The database is busy ({QUEUE_SIZE} writes are waiting); {what} was not saved. "
                               "Try again in a moment.") from None
        return fut.result()

    def _writer_main(self, ready: threading.Event) -> None:
        cur = self.con.cursor()
        self._writer_cur = cur
        self._writer_ident = threading.get_ident()
        ready.set()
        while True:
            item = self._q.get()
            if item is None:
                break
            fn, what, check, transaction, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = self._run(cur, fn, what, check, transaction)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(translate(e, what))
            else:
                fut.set_result(result)
        while True:  # writes that raced with close()
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[4].set_exception(StorageError(f"The database {self.path} was closed; {item[1]} was not saved."))
        try:
            cur.close()
        except Exception:
            pass

    @staticmethod
    def _run(cur, fn, what, check, transaction):
        if transaction:
            cur.execute("BEGIN TRANSACTION")
        try:
            result = fn(cur)
            if transaction:
                cur.execute("COMMIT")
        except BaseException:
            if transaction:
                try:
                    cur.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # already rolled back (failed COMMIT) or aborted
            raise
        # DuckDB may roll a transaction back on a write conflict without raising at COMMIT: read it back.
        if check is not None:
            try:
                ok = check(cur, result)
            except duckdb.Error as e:
                raise StorageError(f"{what} was not saved: reading it back failed ({short(e)}).") from None
            if not ok:
                raise StorageError(f"{what} was not saved (the database rolled the write back). Please try again.")
        return result

    # ---------------------------------------------------------------- close
    def close(self, timeout: float | None = None) -> None:
        """Finish the queued writes, stop the writer, close the connection. With a timeout (used at interpreter
        exit) a writer still busy after it is left alone and the connection is not closed under it."""
        if self.closed:
            return
        self._closing = True
        if self._thread is not None and not self.in_writer():
            try:
                self._q.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)
            if self._thread.is_alive():
                return
        self.closed = True
        with self._cursor_lock:
            for _, c in self._cursors:
                try:
                    c.close()
                except Exception:
                    pass
            self._cursors = []
        try:
            self.con.close()
        except Exception:
            pass


def open_writer(path, read_only: bool) -> Writer:
    path = os.fspath(path)
    if path in ("", MEMORY):
        return Writer(MEMORY, read_only=False)  # private, never shared
    real = os.path.realpath(os.path.expanduser(path))
    with _REGISTRY_LOCK:
        core = _REGISTRY.get(real)
        if core is not None and not core.closed:
            if core.read_only and not read_only:
                raise StorageError(f"The database {real} is already open read-only in this process; "
                                   "close it before opening it read-write.")
            core.refs += 1
            return core
        core = Writer(real, read_only)
        _REGISTRY[real] = core
        return core


def release_writer(core: Writer) -> None:
    with _REGISTRY_LOCK:
        core.refs -= 1
        if core.refs > 0:
            return
        if _REGISTRY.get(core.path) is core:
            del _REGISTRY[core.path]
        core.close()


@atexit.register
def _close_all() -> None:  # checkpoint the files cleanly at interpreter exit
    with _REGISTRY_LOCK:
        cores = list(_REGISTRY.values())
        _REGISTRY.clear()
    for core in cores:
        try:
            core.close(timeout=10.0)
        except Exception:
            pass
