"""Helpers of the fault suite: a child process speaking a line protocol, plain read-only file access."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# One compute thread per process: on a small shared machine OpenMP threads spinning against other processes make a
# 4-token generation take 40 s instead of 3 s. The faults under test do not depend on it.
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Child:
    """A Python subprocess speaking a line protocol on stdout (see the scripts in tests/faults/)."""

    def __init__(self, script: str, *args: str, env: dict | None = None, preexec_fn=None):
        self.proc = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=preexec_fn,
                                     env=dict(os.environ, **QUIET_THREADS, PYTHONUNBUFFERED="1",
                                              PYTHONPATH=str(ROOT), **(env or {})))
        self.lines: list[str] = []

    def readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"the child exited (rc={self.proc.poll()}):\n{err[-3000:]}")
        line = line.rstrip("\n")
        self.lines.append(line)
        return line

    def expect(self, prefix: str) -> str:
        while True:
            line = self.readline()
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass


def db_rows(db: str, sql: str, params=None) -> list[tuple]:
    """Read a database file with a plain read-only DuckDB connection (no Store, no repair)."""
    import duckdb
    with duckdb.connect(db, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()
