"""Store: the public storage API of RLHF Studio (DuckDB only).

Every write runs on the database's single writer thread inside one transaction and returns only after COMMIT
and a read-back check. Reads run on a per-thread cursor and return pandas DataFrames (or dicts for one row).
Timestamps are naive `datetime`s holding UTC. JSON columns come back as Python objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd

from . import importers
from ._core import MEMORY, _short, open_core, release_core
from .errors import InvalidInput, NotFound, StorageError
from .migrations import NOW

FEEDBACK_KINDS = ("stars", "thumbs", "pairwise", "ranking", "critique", "rewrite")
WINNERS = ("a", "b", "tie", "both_bad")
FINISH_REASONS = ("eos", "length", "stop", "human")
RUN_KINDS = ("ppo", "reward")
RUN_STATUSES = ("queued", "running", "completed", "cancelled", "failed", "interrupted")
TIERS = ("fast", "deep")
CHECKPOINTS_KEPT = 2

TABLES = ("prompts", "completions", "criteria", "feedback", "features", "reward_versions", "runs",
          "run_metrics", "run_samples", "adapters", "checkpoints", "retractions")

_COMPLETION_COLS = ("prompt_id", "text", "source", "model_id", "model_revision", "adapter_id", "params", "seed",
                    "prompt_tokens", "completion_tokens", "finish_reason", "latency_s", "corrects_id")
_FEEDBACK_COLS = ("kind", "criterion", "prompt_id", "completion_id", "other_completion_id", "stars", "up",
                  "winner", "ranking", "text", "tags", "rewrite_completion_id", "annotator", "session_id",
                  "idempotency_key", "source")
# which optional label fields each kind accepts (completion_id/prompt_id/meta are handled separately)
_KIND_FIELDS = {
    "stars": {"stars"},
    "thumbs": {"up", "tags"},
    "pairwise": {"other_completion_id", "winner"},
    "ranking": {"ranking"},
    "critique": {"text"},
    "rewrite": {"rewrite_text"},
}
_META_FIELDS = {"kind", "criterion", "prompt_id", "completion_id", "annotator", "session_id", "idempotency_key",
                "source"}


# ------------------------------------------------------------------------------------------------ helpers
def _jsonable(o: Any) -> Any:
    if o is None or isinstance(o, (str, bool, int)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    raise InvalidInput(f"A value of type {type(o).__name__} cannot be stored as JSON.")


def _to_json(o: Any) -> str | None:
    return None if o is None else json.dumps(_jsonable(o), allow_nan=False)


def _from_json(s: Any) -> Any:
    if s is None or (isinstance(s, float) and math.isnan(s)) or s is pd.NA:
        return None
    return json.loads(s) if isinstance(s, str) else s


def _int(v: Any, name: str, *, optional: bool = False, minimum: int | None = None) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise InvalidInput(f"{name} must be an integer, got {v!r}.")
    v = int(v)
    if not -2 ** 63 <= v < 2 ** 63:      # DuckDB's BIGINT; beyond it the query fails with an INT128 error
        raise InvalidInput(f"{name} is out of range, got {v}.")
    if minimum is not None and v < minimum:
        raise InvalidInput(f"{name} must be at least {minimum}, got {v}.")
    return v


def _float(v: Any, name: str, *, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"{name} must be a number, got {v!r}.")
    return float(v)


def _str(v: Any, name: str, *, optional: bool = False, nonempty: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise InvalidInput(f"{name} must be text, got {type(v).__name__}.")
    if nonempty and not v.strip():
        raise InvalidInput(f"{name} must not be empty.")
    return v


def _bytes(v: Any, name: str) -> bytes:
    if isinstance(v, (bytearray, memoryview)):
        v = bytes(v)
    if not isinstance(v, bytes):
        raise InvalidInput(f"{name} must be bytes, got {type(v).__name__}.")
    return v


def _ids(values: Iterable[Any], name: str) -> list[int]:
    return [_int(v, name) for v in values]


def _parse_json_cols(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    for c in cols:
        if c in df.columns:
            df[c] = pd.Series([_from_json(v) for v in df[c]], index=df.index, dtype=object)
    return df


def _rows(cur, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
    return cur.execute(sql, params or []).fetchall()


def _scalar(cur, sql: str, params: Sequence[Any] | None = None) -> Any:
    rows = _rows(cur, sql, params)
    return rows[0][0] if rows else None


def _alloc_ids(cur, sequence: str, n: int) -> list[int]:
    if n == 0:
        return []
    return sorted(r[0] for r in _rows(cur, f"SELECT nextval('{sequence}') FROM range(?)", [n]))


_FRAME_MIN_ROWS = 256  # below this, lists bound as parameters are faster than registering a DataFrame


def _bulk_insert(cur, table: str, cols: dict[str, tuple[str, list]]) -> None:
    """INSERT many rows: cols maps column -> (DuckDB type, values); all value lists have the same length."""
    n = len(next(iter(cols.values()))[1])
    if n == 0:
        return
    names = ", ".join(cols)
    if n < _FRAME_MIN_ROWS:  # parallel unnest zips the lists
        sel = ", ".join(f"unnest(?::{typ}[])" for typ, _ in cols.values())
        cur.execute(f"INSERT INTO {table} ({names}) SELECT {sel}", [v for _, v in cols.values()]).fetchall()
        return
    frame = pd.DataFrame({c: pd.Series(v, dtype="int64" if typ == "BIGINT" and None not in v else object)
                          for c, (typ, v) in cols.items()})
    name = f"_storage_in_{threading.get_ident()}"
    cur.register(name, frame)
    try:
        sel = ", ".join(f"CAST({c} AS {typ})" for c, (typ, _) in cols.items())
        cur.execute(f"INSERT INTO {table} ({names}) SELECT {sel} FROM {name}").fetchall()
    finally:
        cur.unregister(name)


def _existing_prompts(cur, texts: list[str]) -> dict[str, int]:
    if len(texts) < _FRAME_MIN_ROWS:
        return dict(_rows(cur, "SELECT text, id FROM prompts WHERE text IN (SELECT unnest(?::VARCHAR[]))", [texts]))
    name = f"_storage_texts_{threading.get_ident()}"
    cur.register(name, pd.DataFrame({"text": pd.Series(texts, dtype=object)}))
    try:
        return dict(_rows(cur, f"SELECT p.text, p.id FROM prompts p JOIN {name} t ON p.text = t.text"))
    finally:
        cur.unregister(name)


def _count_ids(cur, table: str, ids: Sequence[int], col: str = "id") -> int:
    return _scalar(cur, f"SELECT count(*) FROM {table} WHERE {col} IN (SELECT unnest(?::BIGINT[]))", [list(ids)])


def _valid_unicode(text: str, where: str) -> str:
    """Text that can be stored and hashed: a lone UTF-16 surrogate (a "\\ud800" escape in scraped JSON) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{where} contains a character that is not valid Unicode at position {e.start} "
                           "(a lone surrogate); fix or drop that row.") from None
    return text


def _clean_prompt(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"{where} must be text, got {type(text).__name__}.")
    if not text.strip():
        raise InvalidInput(f"{where} is empty.")
    return _valid_unicode(text, where).strip()


def _prompt_ids(cur, texts: Sequence[str], source: str) -> list[int]:
    """Ids of the (already cleaned) prompt texts, inserting the missing ones; runs inside a write."""
    uniq = list(dict.fromkeys(texts))
    have = _existing_prompts(cur, uniq)
    new = [t for t in uniq if t not in have]
    if new:
        ids = _alloc_ids(cur, "prompt_id_seq", len(new))
        _bulk_insert(cur, "prompts", {"id": ("BIGINT", ids), "text": ("VARCHAR", new),
                                      "source": ("VARCHAR", [source] * len(new))})
        have.update(zip(new, ids))
    return [have[t] for t in texts]


def _criterion_name(name: Any) -> str:
    """1 to 64 letters (any script), digits, spaces, '-' or '_' (surrounding spaces are dropped)."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64 or \
            not all(ch.isalnum() or ch in " -_" for ch in name.strip()):
        raise InvalidInput(f"Invalid criterion name {name!r}: use 1 to 64 letters, digits, spaces, '-' or '_'.")
    return name.strip()


def _import_source(source: Any) -> str:
    source = _str(source, "source").strip()
    return source if source.startswith("import:") else f"import:{source}"


# ------------------------------------------------------------------------------------------------ Store

def normalise_feedback(fields: Mapping[str, Any], kinds: Sequence[str] = FEEDBACK_KINDS) -> dict[str, Any]:
    """One label's fields checked and normalised (the row add_feedback writes); InvalidInput says what is wrong.
    `kinds` narrows the kinds accepted (the bulk path takes no rewrites)."""
    kind = fields.get("kind")
    if kind not in kinds:
        raise InvalidInput(f"Unknown feedback kind {kind!r}; use one of {', '.join(kinds)}.")
    allowed = _META_FIELDS | _KIND_FIELDS[kind]
    extra = {k for k, v in fields.items() if k not in allowed and v is not None}
    if extra:
        raise InvalidInput(f"Field(s) {', '.join(sorted(extra))} do not apply to a {kind} label.")
    f = {k: fields.get(k) for k in _FEEDBACK_COLS}
    f["criterion"] = _criterion_name(f["criterion"]) if f["criterion"] is not None else "overall"
    f["annotator"] = _str(f["annotator"], "annotator").strip() if f["annotator"] is not None else "local"
    f["session_id"] = _str(f["session_id"], "session_id", optional=True)
    f["idempotency_key"] = _str(f["idempotency_key"], "idempotency_key", optional=True)
    f["source"] = _str(f["source"], "source").strip() if f["source"] is not None else "human"
    f["prompt_id"] = _int(f["prompt_id"], "prompt_id", optional=True)
    if kind == "ranking":
        if f["completion_id"] is not None:
            raise InvalidInput("A ranking label takes `ranking` (completion ids, best first), not completion_id.")
        r = f["ranking"]
        if isinstance(r, (str, bytes)) or not isinstance(r, (list, tuple, np.ndarray)):
            raise InvalidInput("ranking must be a list of completion ids, best first.")
        r = _ids(list(r), "ranking entry")
        if len(r) < 2:
            raise InvalidInput("A ranking needs at least 2 completions.")
        if len(set(r)) != len(r):
            raise InvalidInput("A ranking must list each completion once.")
        f["ranking"] = r
    else:
        f["completion_id"] = _int(f["completion_id"], "completion_id")
    if kind == "stars":
        s = f["stars"]
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not 1 <= int(s) <= 5:
            raise InvalidInput(f"stars must be an integer from 1 to 5, got {s!r}.")
        f["stars"] = int(s)
    elif kind == "thumbs":
        if not isinstance(f["up"], (bool, np.bool_)):
            raise InvalidInput(f"up must be True (thumbs up) or False (thumbs down), got {f['up']!r}.")
        f["up"] = bool(f["up"])
        tags = f["tags"]
        if tags is not None:
            if isinstance(tags, str) or not isinstance(tags, (list, tuple, set)):
                raise InvalidInput("tags must be a list of texts.")
            f["tags"] = [_str(t, "tag").strip() for t in tags]
    elif kind == "pairwise":
        f["other_completion_id"] = _int(f["other_completion_id"], "other_completion_id")
        if f["winner"] not in WINNERS:
            raise InvalidInput(f"winner must be one of {', '.join(WINNERS)}, got {f['winner']!r}.")
        if f["completion_id"] == f["other_completion_id"]:
            raise InvalidInput("A pairwise label needs two different completions.")
    elif kind == "critique":
        t = f["text"]
        if not isinstance(t, str) or not t.strip():
            raise InvalidInput("A critique needs non-empty text.")
        f["text"] = t.strip()
    elif kind == "rewrite":
        rewrite_text = fields.get("rewrite_text")
        if not isinstance(rewrite_text, str) or not rewrite_text.strip():
            raise InvalidInput("A rewrite needs the non-empty rewritten text (rewrite_text).")
    return f


class Store:
    """One RLHF Studio database file. See docs/ARCHITECTURE.md (storage.Store contract)."""

    def __init__(self, path: str | os.PathLike = MEMORY, read_only: bool = False):
        self._core = open_core(path, read_only)
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
        release_core(self._core)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Store":
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
            raise StorageError(f"Reading the database failed: {_short(e)}") from None

    def _rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        try:
            return _rows(self._cur(), sql, params)
        except duckdb.Error as e:
            raise StorageError(f"Reading the database failed: {_short(e)}") from None

    def _write(self, fn, what: str, check=None, transaction: bool = True):
        if self._closed:
            raise StorageError(f"The database {self.path} is closed; {what} was not saved.")
        if self.read_only:
            raise StorageError(f"The database {self.path} is open read-only; {what} was not saved.")
        return self._core.write(fn, what, check, transaction)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query (e.g. on the views) and return a DataFrame. Never write through this."""
        return self._df(sql, params)

    def schema_version(self) -> int:
        return int(self._rows("SELECT max(version) FROM schema_version")[0][0])

    # ------------------------------------------------------------ criteria
    def add_criterion(self, name: str, description: str = "") -> str:
        name = _criterion_name(name)
        description = _str(description, "description", nonempty=False) if description is not None else ""

        def fn(cur):
            cur.execute("INSERT INTO criteria (name, description) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET description = excluded.description",
                        [name, description]).fetchall()
            return name

        self._write(fn, f"criterion {name!r}", lambda cur, _: _scalar(
            cur, "SELECT count(*) FROM criteria WHERE name = ? AND description = ?", [name, description]) == 1)
        return name

    def criteria(self) -> pd.DataFrame:
        return self._df("SELECT name, description, created_at FROM criteria ORDER BY created_at, name")

    # ------------------------------------------------------------ prompts
    def add_prompt(self, text: str, source: str = "manual") -> int:
        return self.add_prompts([text], source)[0]

    def add_prompts(self, texts: Sequence[str], source: str = "manual") -> list[int]:
        if isinstance(texts, str):
            raise InvalidInput("add_prompts expects a list of texts, not one string.")
        texts = list(texts)
        clean = [_clean_prompt(t, f"Prompt {i}" if len(texts) > 1 else "The prompt") for i, t in
                 enumerate(texts, 1)]
        source = _str(source, "source").strip()
        return self._insert_prompts(clean, source, "the prompts" if len(clean) > 1 else "the prompt")

    def _insert_prompts(self, clean: list[str], source: str, what: str) -> list[int]:
        if not clean:
            return []
        return self._write(lambda cur: _prompt_ids(cur, clean, source), what,
                           lambda cur, ids: _count_ids(cur, "prompts", ids) == len(set(ids)))

    def import_prompts(self, path: str | os.PathLike, source: str | None = None) -> int:
        """Import a .txt/.jsonl/.csv/.parquet prompt file in one transaction. Returns the number of prompts
        in the file (prompts already present are reused, not duplicated). source defaults to 'import:<name>'."""
        rows = importers.read_prompt_file(path)
        source = _str(source, "source").strip() if source is not None else f"import:{os.path.basename(os.fspath(path))}"
        name = os.path.basename(os.fspath(path))
        unit = "row" if name.lower().endswith(".parquet") else "line"
        clean = [_clean_prompt(t, f"{name}, {unit} {n}: the prompt") for n, t in rows]
        self._insert_prompts(clean, source, f"the prompts of {name}")
        return len(rows)

    def prompts(self) -> pd.DataFrame:
        """All prompts with n_completions and n_labels (current labels on the prompt or its completions)."""
        return self._df("""
            SELECT p.id, p.text, p.source, p.created_at,
                   coalesce(c.n, 0)::BIGINT AS n_completions, coalesce(f.n, 0)::BIGINT AS n_labels
            FROM prompts p
            LEFT JOIN (SELECT prompt_id, count(*) n FROM completions GROUP BY prompt_id) c ON c.prompt_id = p.id
            LEFT JOIN (SELECT prompt_id, count(*) n FROM feedback_current GROUP BY prompt_id) f
                   ON f.prompt_id = p.id
            ORDER BY p.id""")

    def next_prompt(self, annotator: str | None = None) -> dict | None:
        """The prompt with the fewest current labels (ties by id); with an annotator, prompts that annotator
        has not labelled come first."""
        annotator = _str(annotator, "annotator", optional=True)
        rows = self._rows("""
            SELECT p.id, p.text FROM prompts p
            LEFT JOIN (SELECT prompt_id, count(*) AS n, bool_or(annotator = ?) AS mine
                       FROM feedback_current GROUP BY prompt_id) f ON f.prompt_id = p.id
            ORDER BY coalesce(f.mine, false), coalesce(f.n, 0), p.id
            LIMIT 1""", [annotator])
        return {"id": rows[0][0], "text": rows[0][1]} if rows else None

    # ------------------------------------------------------------ completions
    def _completion_row(self, row: Mapping[str, Any], where: str) -> list[Any]:
        if not isinstance(row, Mapping):
            raise InvalidInput(f"{where} must be a dict.")
        unknown = set(row) - set(_COMPLETION_COLS)
        if unknown:
            raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}.")
        r = dict(row)
        source = r.get("source") or "model"
        if not isinstance(source, str) or not (source in ("model", "human") or
                                               (source.startswith("import:") and len(source) > 7)):
            raise InvalidInput(f"{where}: source must be 'model', 'human' or 'import:<name>', got {source!r}.")
        if r.get("finish_reason") is not None and r["finish_reason"] not in FINISH_REASONS:
            raise InvalidInput(f"{where}: finish_reason must be one of {', '.join(FINISH_REASONS)} or None.")
        if "text" not in r:
            raise InvalidInput(f"{where}: text is missing.")
        return [
            _int(r.get("prompt_id"), f"{where}: prompt_id"),
            _str(r["text"], f"{where}: text", nonempty=False),
            source,
            _str(r.get("model_id"), f"{where}: model_id", optional=True),
            _str(r.get("model_revision"), f"{where}: model_revision", optional=True),
            _int(r.get("adapter_id"), f"{where}: adapter_id", optional=True),
            _to_json(r.get("params")),
            _int(r.get("seed"), f"{where}: seed", optional=True),
            _int(r.get("prompt_tokens"), f"{where}: prompt_tokens", optional=True, minimum=0),
            _int(r.get("completion_tokens"), f"{where}: completion_tokens", optional=True, minimum=0),
            r.get("finish_reason"),
            _float(r.get("latency_s"), f"{where}: latency_s", optional=True),
            _int(r.get("corrects_id"), f"{where}: corrects_id", optional=True),
        ]

    @staticmethod
    def _insert_completions(cur, values: list[list[Any]]) -> list[int]:
        prompt_ids = sorted({v[0] for v in values})
        missing = set(prompt_ids) - {r[0] for r in _rows(
            cur, "SELECT id FROM prompts WHERE id IN (SELECT unnest(?::BIGINT[]))", [prompt_ids])}
        if missing:
            raise NotFound(f"no prompt with id {min(missing)}")
        corrects = sorted({v[12] for v in values if v[12] is not None})
        if corrects:
            found = {r[0] for r in _rows(cur, "SELECT id FROM completions WHERE id IN "
                                              "(SELECT unnest(?::BIGINT[]))", [corrects])}
            if set(corrects) - found:
                raise NotFound(f"no completion with id {min(set(corrects) - found)}")
        adapters = sorted({v[5] for v in values if v[5] is not None})
        if adapters:
            found = {r[0] for r in _rows(cur, "SELECT id FROM adapters WHERE id IN (SELECT unnest(?::BIGINT[]))",
                                         [adapters])}
            if set(adapters) - found:
                raise NotFound(f"no adapter with id {min(set(adapters) - found)}")
        cols = ", ".join(_COMPLETION_COLS)
        marks = ", ".join("?" for _ in _COMPLETION_COLS)
        sql = f"INSERT INTO completions (id, {cols}) VALUES (nextval('completion_id_seq'), {marks}) RETURNING id"
        return [cur.execute(sql, v).fetchall()[0][0] for v in values]

    def add_completions(self, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        values = [self._completion_row(r, f"Completion {i}") for i, r in enumerate(rows, 1)]
        if not values:
            return []
        return self._write(lambda cur: self._insert_completions(cur, values),
                           "the completions" if len(values) > 1 else "the completion",
                           lambda cur, ids: _count_ids(cur, "completions", ids) == len(ids))

    def add_generation(self, prompt: str, rows: Sequence[Mapping[str, Any]], source: str = "manual"
                       ) -> tuple[int, list[int]]:
        """A prompt (reused if present) and the completions generated for it, in ONE transaction: a refused
        completion leaves no prompt behind without its completions. `rows` as for add_completions, without
        prompt_id. Returns (prompt_id, completion ids)."""
        text = _clean_prompt(prompt, "The prompt")
        source = _str(source, "source").strip()
        values = [self._completion_row({**r, "prompt_id": 0}, f"Completion {i}") if isinstance(r, Mapping)
                  else self._completion_row(r, f"Completion {i}") for i, r in enumerate(rows, 1)]

        def fn(cur):
            pid = _prompt_ids(cur, [text], source)[0]
            for v in values:
                v[0] = pid
            return pid, self._insert_completions(cur, values) if values else []

        return self._write(fn, "the prompt and its completions", lambda cur, res: _count_ids(
            cur, "prompts", [res[0]]) == 1 and _count_ids(cur, "completions", res[1]) == len(res[1]))

    def add_completion(self, **row: Any) -> int:
        return self.add_completions([row])[0]

    _COMPLETION_SELECT = ("SELECT id, prompt_id, text, source, model_id, model_revision, adapter_id, params, seed, "
                          "prompt_tokens, completion_tokens, finish_reason, latency_s, corrects_id, created_at "
                          "FROM completions")

    def get_completion(self, completion_id: int) -> dict:
        cid = _int(completion_id, "completion_id")
        df = self._df(self._COMPLETION_SELECT + " WHERE id = ?", [cid])
        if df.empty:
            raise NotFound(f"no completion with id {cid}")
        return self._records(_parse_json_cols(df, ["params"]))[0]

    def completions(self, prompt_id: int | None = None) -> pd.DataFrame:
        if prompt_id is None:
            df = self._df(self._COMPLETION_SELECT + " ORDER BY id")
        else:
            df = self._df(self._COMPLETION_SELECT + " WHERE prompt_id = ? ORDER BY id", [_int(prompt_id, "prompt_id")])
        return _parse_json_cols(df, ["params"])

    def completion_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM completions")[0][0])

    @staticmethod
    def _records(df: pd.DataFrame) -> list[dict]:
        out = []
        for rec in df.to_dict("records"):
            for k, v in rec.items():
                if v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
                    rec[k] = None
                elif isinstance(v, pd.Timestamp):
                    rec[k] = v.to_pydatetime()
                elif isinstance(v, np.generic):
                    rec[k] = v.item()
            out.append(rec)
        return out

    # ------------------------------------------------------------ feedback
    def add_feedback(self, **fields: Any) -> int:
        """Add one label. Returns the feedback id (for kind='rewrite' pass rewrite_text; see add_rewrite)."""
        return self._add_feedback(fields)[0]

    def add_rewrite(self, completion_id: int, text: str, **meta: Any) -> tuple[int, int]:
        """A human rewrite of a completion: adds the human completion and the 'rewrite' label in one
        transaction. Returns (feedback_id, new_completion_id)."""
        fb, new = self._add_feedback({**meta, "kind": "rewrite", "completion_id": completion_id,
                                      "rewrite_text": text})
        return fb, new

    def _add_feedback(self, fields: dict[str, Any]) -> tuple[int, int | None]:
        f = normalise_feedback(fields)
        kind, rewrite_text = f["kind"], fields.get("rewrite_text") if f["kind"] == "rewrite" else None

        def fn(cur):
            key = f["idempotency_key"]
            if key is not None:
                same = ("kind", "criterion", "completion_id", "other_completion_id", "stars", "up", "winner",
                        "ranking", "text", "tags", "annotator")
                hit = _rows(cur, f"SELECT id, rewrite_completion_id, {', '.join(same)}, (SELECT text FROM "
                                 "completions WHERE id = rewrite_completion_id) FROM feedback WHERE idempotency_key = ?",
                            [key])
                if hit:
                    # a retry says the same again; the same key on another label would drop that label unseen
                    stored = dict(zip(same + ("rewrite_text",), hit[0][2:]))
                    asked = {c: f[c] for c in same} | {"rewrite_text": rewrite_text.strip() if rewrite_text else None}
                    for c in ("ranking", "tags"):
                        stored[c] = list(stored[c]) if stored[c] is not None else None
                    if stored != asked:
                        raise InvalidInput(f"The idempotency key {key!r} was already used for another label "
                                           f"(#{hit[0][0]}); use a new key for a new label.")
                    return hit[0][0], hit[0][1], True
            if not _rows(cur, "SELECT 1 FROM criteria WHERE name = ?", [f["criterion"]]):
                raise InvalidInput(f"Unknown criterion {f['criterion']!r}; add it first.")
            targets = f["ranking"] if kind == "ranking" else [
                c for c in (f["completion_id"], f["other_completion_id"]) if c is not None]
            prompt_of = dict(_rows(cur, "SELECT id, prompt_id FROM completions WHERE id IN "
                                        "(SELECT unnest(?::BIGINT[]))", [targets]))
            for c in targets:
                if c not in prompt_of:
                    raise NotFound(f"no completion with id {c}")
            prompts = {prompt_of[c] for c in targets}
            if len(prompts) > 1:
                what = "pairwise label" if kind == "pairwise" else "ranking"
                raise InvalidInput(f"All completions of a {what} must answer the same prompt.")
            pid = prompts.pop()
            if f["prompt_id"] is not None and f["prompt_id"] != pid:
                raise InvalidInput(f"prompt_id {f['prompt_id']} does not match the completion's prompt {pid}.")
            f["prompt_id"] = pid
            if kind == "rewrite":
                f["rewrite_completion_id"] = self._insert_completions(cur, [[
                    pid, rewrite_text.strip(), "human", None, None, None, None, None, None, None, "human", None,
                    f["completion_id"]]])[0]
            cols = ", ".join(_FEEDBACK_COLS)
            marks = ", ".join("?::BIGINT[]" if c == "ranking" else "?::VARCHAR[]" if c == "tags" else "?"
                              for c in _FEEDBACK_COLS)
            fid = cur.execute(f"INSERT INTO feedback (id, {cols}) VALUES (nextval('feedback_id_seq'), {marks}) "
                              "RETURNING id", [f[c] for c in _FEEDBACK_COLS]).fetchall()[0][0]
            return fid, f["rewrite_completion_id"], False

        def check(cur, res):
            fid, new_cid, _ = res
            if _scalar(cur, "SELECT count(*) FROM feedback WHERE id = ?", [fid]) != 1:
                return False
            return new_cid is None or _scalar(cur, "SELECT count(*) FROM completions WHERE id = ?", [new_cid]) == 1

        fid, new_cid, _ = self._write(fn, f"the {kind} label", check)
        return fid, new_cid

    def feedback(self, history: bool = False, kind: str | None = None, annotator: str | None = None) -> pd.DataFrame:
        """Current labels (the latest not withdrawn per kind, criterion, annotator and target); history=True:
        every label with `superseded` (a later label replaced it) and `retracted` (it was withdrawn) columns."""
        if kind is not None and kind not in FEEDBACK_KINDS:
            raise InvalidInput(f"Unknown feedback kind {kind!r}; use one of {', '.join(FEEDBACK_KINDS)}.")
        view = "feedback_history" if history else "feedback_current"
        return self._df(f"SELECT * FROM {view} WHERE (? IS NULL OR kind = ?) AND (? IS NULL OR annotator = ?) "
                        "ORDER BY id", [kind, kind, annotator, annotator])

    # ------------------------------------------------------------ withdrawing labels
    def retract_feedback(self, feedback_id: int, *, annotator: str = "local", own_only: bool = False,
                         session_id: str | None = None, reason: str | None = None,
                         idempotency_key: str | None = None) -> dict:
        """Withdraw one label (a mislabel). The label stays in the history, marked `retracted`; whatever label it
        had replaced is current again. `own_only`: refuse a label given by another annotator. Returns what
        `undo_last_feedback` returns."""
        fid = _int(feedback_id, "feedback id")
        return self._retract(lambda cur: fid, annotator, own_only, session_id, reason, idempotency_key)

    def undo_last_feedback(self, annotator: str = "local", session_id: str | None = None,
                           idempotency_key: str | None = None) -> dict:
        """Withdraw the newest label that `annotator` gave (in `session_id` only, when given) and has not
        withdrawn yet. Returns {"retraction_id", "label": the withdrawn label (a feedback_history row as a
        dict), "restored_id": the label current again in its place, or None}."""
        who = _str(annotator, "annotator")
        session = _str(session_id, "session id", optional=True)

        def newest(cur):
            rows = _rows(cur, "SELECT id FROM feedback_live WHERE annotator = ? AND source = 'human' "
                              "AND (?::VARCHAR IS NULL OR session_id = ?) ORDER BY id DESC LIMIT 1",
                         [who, session, session])
            if not rows:
                raise NotFound("Nothing to undo: you have no label left to withdraw"
                               + (" in this session." if session else "."))
            return rows[0][0]

        return self._retract(newest, who, True, session, None, idempotency_key)

    def _retract(self, pick, annotator, own_only, session_id, reason, idempotency_key) -> dict:
        who = _str(annotator, "annotator")
        session = _str(session_id, "session id", optional=True)
        reason = " ".join(_str(reason, "reason").split()) if reason is not None and str(reason).strip() else None
        key = _str(idempotency_key, "idempotency key", optional=True)

        def fn(cur):
            if key is not None:
                hit = _rows(cur, "SELECT id, feedback_id FROM retractions WHERE idempotency_key = ?", [key])
                if hit:
                    return hit[0]
            fid = pick(cur)
            row = _rows(cur, "SELECT annotator, id IN (SELECT feedback_id FROM retractions) FROM feedback "
                             "WHERE id = ?", [fid])
            if not row:
                raise NotFound(f"no label with id {fid}")
            given_by, withdrawn = row[0]
            if withdrawn:
                raise InvalidInput(f"Label {fid} was already withdrawn.")
            if own_only and given_by != who:
                raise InvalidInput(f"Label {fid} was given by {given_by!r}; you can only withdraw your own labels.")
            rid = cur.execute("INSERT INTO retractions (id, feedback_id, annotator, session_id, reason, "
                              "idempotency_key) VALUES (nextval('retraction_id_seq'), ?, ?, ?, ?, ?) RETURNING id",
                              [fid, who, session, reason, key]).fetchall()[0][0]
            return rid, fid

        rid, fid = self._write(fn, "the withdrawal of a label", lambda cur, res: _scalar(
            cur, "SELECT count(*) FROM retractions WHERE id = ? AND feedback_id = ?", list(res)) == 1)
        label = self._records(self._df("SELECT * FROM feedback_history WHERE id = ?", [fid]))[0]
        restored = self._rows("SELECT id FROM feedback_current WHERE kind = ? AND criterion = ? AND annotator = ? "
                              "AND target = ?", [label["kind"], label["criterion"], label["annotator"],
                                                 label["target"]])
        return {"retraction_id": int(rid), "label": label, "restored_id": int(restored[0][0]) if restored else None}

    def retractions(self) -> pd.DataFrame:
        """Every withdrawal: id, feedback_id, annotator (who withdrew it), session_id, reason, created_at."""
        return self._df("SELECT id, feedback_id, annotator, session_id, reason, created_at FROM retractions "
                         "ORDER BY id")

    # ------------------------------------------------------------ preference pairs
    @staticmethod
    def _criteria_weights(criterion: str | Mapping[str, float]) -> tuple[list[str], list[float]]:
        if isinstance(criterion, str):
            return [criterion], [1.0]
        if not isinstance(criterion, Mapping) or not criterion:
            raise InvalidInput("criterion must be a name or a non-empty dict {name: weight}.")
        names, weights = [], []
        for name, w in criterion.items():
            w = _float(w, f"weight of {name!r}")
            if not math.isfinite(w) or w <= 0:
                raise InvalidInput(f"The weight of criterion {name!r} must be a positive number, got {w}.")
            names.append(str(name))
            weights.append(w)
        return names, weights

    _PAIRS_SQL = """
        SELECT p.prompt_id, p.chosen_id, p.rejected_id, p.margin * w.weight AS margin, p.kind, p.feedback_id,
               p.criterion, p.annotator, p.source, p.pair_key, p.heldout
        FROM preference_pairs p
        JOIN (SELECT unnest(?::VARCHAR[]) AS criterion, unnest(?::DOUBLE[]) AS weight) w
          ON p.criterion = w.criterion"""

    def preference_pairs(self, criterion: str | Mapping[str, float] = "overall") -> pd.DataFrame:
        """Pairs from the `preference_pairs` view for one criterion, or for several criteria {name: weight}
        combined (their pairs concatenated, margins multiplied by the weight)."""
        names, weights = self._criteria_weights(criterion)
        return self._df(self._PAIRS_SQL + " ORDER BY p.feedback_id, p.chosen_id, p.rejected_id, p.criterion",
                        [names, weights])

    def pair_conflicts(self, criterion: str | Mapping[str, float] = "overall") -> int:
        """Number of unordered pairs that appear in both directions."""
        names, weights = self._criteria_weights(criterion)
        return int(self._rows(f"SELECT count(*) FROM (SELECT pair_key FROM ({self._PAIRS_SQL}) "
                              "GROUP BY pair_key HAVING count(DISTINCT chosen_id) > 1)", [names, weights])[0][0])

    def import_preference_pairs(self, rows: Sequence[Mapping[str, str]], source: str,
                                criterion: str = "overall") -> int:
        """Import {prompt, chosen, rejected} rows (one transaction): the prompt (reused if present), two
        completions with source 'import:<source>' and a pairwise label (A = chosen, winner 'a', annotator =
        that source). Rows already imported from the same source (same texts) and rows whose chosen equals
        rejected are skipped. Returns the number of pairs added."""
        src = _import_source(source)
        criterion = _criterion_name(criterion)
        prompts, chosen, rejected, keys = [], [], [], []
        seen: set[str] = set()
        for i, row in enumerate(rows, 1):
            if not isinstance(row, Mapping):
                raise InvalidInput(f"Pair {i} must be a dict with prompt, chosen and rejected.")
            for k in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(k), str):
                    raise InvalidInput(f"Pair {i}: {k} must be text, got {type(row.get(k)).__name__}.")
            p = _clean_prompt(row["prompt"], f"Pair {i}: the prompt")
            for k in ("chosen", "rejected"):
                _valid_unicode(row[k], f"Pair {i}: {k}")
            if row["chosen"] == row["rejected"]:
                continue
            key = src + ":" + hashlib.sha256("\x1f".join((criterion, p, row["chosen"], row["rejected"]))
                                             .encode()).hexdigest()[:32]
            if key in seen:
                continue
            seen.add(key)
            prompts.append(p)
            chosen.append(row["chosen"])
            rejected.append(row["rejected"])
            keys.append(key)

        def fn(cur):
            if not _rows(cur, "SELECT 1 FROM criteria WHERE name = ?", [criterion]):
                raise InvalidInput(f"Unknown criterion {criterion!r}; add it first.")
            done = {r[0] for r in _rows(cur, "SELECT idempotency_key FROM feedback WHERE idempotency_key IN "
                                             "(SELECT unnest(?::VARCHAR[]))", [keys])} if keys else set()
            todo = [i for i, k in enumerate(keys) if k not in done]
            if not todo:
                return []
            pids = _prompt_ids(cur, [prompts[i] for i in todo], src)
            n = len(todo)
            cids = _alloc_ids(cur, "completion_id_seq", 2 * n)
            fids = _alloc_ids(cur, "feedback_id_seq", n)
            a, b = cids[0::2], cids[1::2]
            _bulk_insert(cur, "completions", {
                "id": ("BIGINT", a + b),
                "prompt_id": ("BIGINT", pids + pids),
                "text": ("VARCHAR", [chosen[i] for i in todo] + [rejected[i] for i in todo]),
                "source": ("VARCHAR", [src] * (2 * n))})
            _bulk_insert(cur, "feedback", {
                "id": ("BIGINT", fids),
                "kind": ("VARCHAR", ["pairwise"] * n),
                "criterion": ("VARCHAR", [criterion] * n),
                "prompt_id": ("BIGINT", pids),
                "completion_id": ("BIGINT", a),
                "other_completion_id": ("BIGINT", b),
                "winner": ("VARCHAR", ["a"] * n),
                "annotator": ("VARCHAR", [src] * n),
                "idempotency_key": ("VARCHAR", [keys[i] for i in todo]),
                "source": ("VARCHAR", [src] * n)})
            return fids

        fids = self._write(fn, f"the pairs from {src}",
                           lambda cur, ids: _count_ids(cur, "feedback", ids) == len(ids))
        return len(fids)

    # ------------------------------------------------------------ features cache
    def put_features(self, model_revision: str, completion_ids: Sequence[int], vectors) -> None:
        rev = _str(model_revision, "model_revision")
        ids = _ids(completion_ids, "completion id")
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
            found = {r[0] for r in _rows(cur, "SELECT id FROM completions WHERE id IN (SELECT unnest(?::BIGINT[]))",
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

        self._write(fn, "the features", lambda cur, _: _scalar(
            cur, "SELECT count(*) FROM features WHERE model_revision = ? AND completion_id IN "
                 "(SELECT unnest(?::BIGINT[]))", [rev, ids]) == len(ids))

    def get_features(self, model_revision: str, completion_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Cached vectors (float32) for those of the ids that have one."""
        ids = _ids(completion_ids, "completion id")
        if not ids:
            return {}
        try:
            res = self._cur().execute(
                "SELECT completion_id, vec FROM features WHERE model_revision = ? AND completion_id IN "
                "(SELECT unnest(?::BIGINT[]))", [_str(model_revision, "model_revision"), ids]).fetchnumpy()
        except duckdb.Error as e:
            raise StorageError(f"Reading the database failed: {_short(e)}") from None
        return {int(c): np.asarray(v, dtype=np.float32) for c, v in zip(res["completion_id"], res["vec"])}

    # ------------------------------------------------------------ reward model versions
    def add_reward_version(self, tier: str, criterion: str | Mapping[str, float], config: Mapping[str, Any],
                           pair_ids: Sequence[Any], labels_seen: int, metrics: Mapping[str, Any],
                           weights: bytes | None, parent_id: int | None = None) -> int:
        if tier not in TIERS:
            raise InvalidInput(f"tier must be one of {', '.join(TIERS)}, got {tier!r}.")
        if isinstance(criterion, Mapping):
            self._criteria_weights(criterion)
            crit = json.dumps(_jsonable(dict(criterion)), sort_keys=True)
        else:
            crit = _criterion_name(criterion)
        values = [tier, _int(parent_id, "parent_id", optional=True), crit, _to_json(dict(config or {})),
                  _to_json(list(pair_ids)), _int(labels_seen, "labels_seen", minimum=0),
                  _to_json(dict(metrics or {})), None if weights is None else _bytes(weights, "weights")]

        def fn(cur):
            if values[1] is not None and not _rows(cur, "SELECT 1 FROM reward_versions WHERE id = ?", [values[1]]):
                raise NotFound(f"no reward model version with id {values[1]}")
            return cur.execute(
                "INSERT INTO reward_versions (id, tier, parent_id, criterion, config, pair_ids, labels_seen, "
                "metrics, weights) VALUES (nextval('reward_version_id_seq'), ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                values).fetchall()[0][0]

        return self._write(fn, "the reward model version",
                           lambda cur, vid: _count_ids(cur, "reward_versions", [vid]) == 1)

    @property
    def warnings(self) -> list[str]:
        """Start-up warnings (a write-ahead log moved aside, a damaged free block), for the UI."""
        return list(self._core.warnings)

    def latest_reward_version(self, tier: str, with_weights: bool = True) -> dict | None:
        """The newest version of a tier (that has stored weights, if with_weights), or None."""
        cond = " AND weights IS NOT NULL" if with_weights else ""
        df = self._df(f"SELECT id FROM reward_versions WHERE tier = ?{cond} ORDER BY id DESC LIMIT 1", [tier])
        return None if df.empty else self.reward_version(int(df["id"].iloc[0]))

    def reward_versions(self) -> pd.DataFrame:
        df = self._df("SELECT id, tier, parent_id, criterion, config, pair_ids, labels_seen, metrics, "
                      "octet_length(weights) AS weights_bytes, created_at FROM reward_versions ORDER BY id")
        return _parse_json_cols(df, ["config", "pair_ids", "metrics"])

    def reward_version(self, version_id: int) -> dict:
        vid = _int(version_id, "version id")
        df = self._df("SELECT * FROM reward_versions WHERE id = ?", [vid])
        if df.empty:
            raise NotFound(f"no reward model version with id {vid}")
        rec = self._records(_parse_json_cols(df, ["config", "pair_ids", "metrics"]))[0]
        # automatic fast refits keep their metrics but not always their weights (migration 2)
        rec["weights"] = None if rec["weights"] is None else bytes(rec["weights"])
        return rec

    def reward_metrics(self) -> pd.DataFrame:
        """One row per version: version, tier, criterion, labels_seen, heldout_accuracy, heldout_loss,
        heldout_pairs, the other metrics (nested keys flattened as 'a.b'), created_at."""
        df = self._df("SELECT id AS version, tier, criterion, labels_seen, metrics, created_at "
                      "FROM reward_versions ORDER BY id")
        metrics = pd.json_normalize([_from_json(m) or {} for m in df["metrics"]], sep=".")
        metrics.index = df.index
        base = df.drop(columns=["metrics", "created_at"])
        for col in ("heldout_accuracy", "heldout_loss", "heldout_pairs"):
            if col not in metrics.columns:
                metrics[col] = np.nan
        metrics = metrics.drop(columns=[c for c in metrics.columns if c in base.columns])
        first = ["heldout_accuracy", "heldout_loss", "heldout_pairs"]
        metrics = metrics[first + sorted(c for c in metrics.columns if c not in first)]
        return pd.concat([base, metrics, df[["created_at"]]], axis=1)

    # ------------------------------------------------------------ runs
    def create_run(self, kind: str, config: Mapping[str, Any] | None = None,
                   lineage: Mapping[str, Any] | None = None) -> int:
        if kind not in RUN_KINDS:
            raise InvalidInput(f"run kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}.")
        values = [kind, _to_json(dict(config or {})), _to_json(dict(lineage or {}))]
        return self._write(
            lambda cur: cur.execute("INSERT INTO runs (id, kind, status, config, lineage) VALUES "
                                    "(nextval('run_id_seq'), ?, 'queued', ?, ?) RETURNING id", values).fetchall()[0][0],
            "the run", lambda cur, rid: _count_ids(cur, "runs", [rid]) == 1)

    def _require_run(self, cur, run_id: int) -> None:
        if not _rows(cur, "SELECT 1 FROM runs WHERE id = ?", [run_id]):
            raise NotFound(f"no run with id {run_id}")

    def set_run_status(self, run_id: int, status: str, error: str | None = None) -> None:
        rid = _int(run_id, "run_id")
        if status not in RUN_STATUSES:
            raise InvalidInput(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}.")
        error = _str(error, "error", optional=True, nonempty=False)

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute(f"UPDATE runs SET status = ?, error = ?, updated_at = {NOW} WHERE id = ?",
                        [status, error, rid]).fetchall()

        self._write(fn, f"the status of run {rid}", lambda cur, _: _scalar(
            cur, "SELECT count(*) FROM runs WHERE id = ? AND status = ? AND error IS NOT DISTINCT FROM ?",
            [rid, status, error]) == 1)

    def add_run_note(self, run_id: int, note: str) -> None:
        """Append a line to the run's notes (what it did differently from its config and went on); a note it
        already has is not added again (a resumed run may say the same thing)."""
        rid = _int(run_id, "run_id")
        note = " ".join(_str(note, "note").split())     # one line, as the notes are read line by line

        has_note = "list_contains(string_split(coalesce(notes, ''), chr(10)), ?)"   # as a whole line

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute(f"UPDATE runs SET notes = CASE WHEN notes IS NULL THEN ? ELSE notes || chr(10) || ? END, "
                        f"updated_at = {NOW} WHERE id = ? AND NOT {has_note}", [note, note, rid, note]).fetchall()

        self._write(fn, f"a note on run {rid}", lambda cur, _: _scalar(
            cur, f"SELECT count(*) FROM runs WHERE id = ? AND {has_note}", [rid, note]) == 1)

    def mark_running_interrupted(self) -> int:
        """Runs left 'running' or 'queued' by a previous process become 'interrupted'. Returns how many."""
        def fn(cur):
            # no UPDATE ... RETURNING: DuckDB turns it into delete+insert, which the foreign keys that
            # reference runs (metrics, checkpoints, ...) refuse
            ids = [r[0] for r in _rows(cur, "SELECT id FROM runs WHERE status IN ('running', 'queued')")]
            if ids:
                cur.execute(f"UPDATE runs SET status = 'interrupted', updated_at = {NOW} "
                            "WHERE id IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall()
            return ids

        ids = self._write(fn, "the interrupted runs", lambda cur, ids: not ids or _scalar(
            cur, "SELECT count(*) FROM runs WHERE status = 'interrupted' AND id IN (SELECT unnest(?::BIGINT[]))",
            [ids]) == len(ids))
        return len(ids)

    def runs(self) -> pd.DataFrame:
        return _parse_json_cols(self._df("SELECT * FROM runs ORDER BY id"), ["config", "lineage"])

    def run(self, run_id: int) -> dict:
        rid = _int(run_id, "run_id")
        df = self._df("SELECT * FROM runs WHERE id = ?", [rid])
        if df.empty:
            raise NotFound(f"no run with id {rid}")
        return self._records(_parse_json_cols(df, ["config", "lineage"]))[0]

    def add_run_metrics(self, run_id: int, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one step (a metric written again for the same step replaces the old value)."""
        rid, step = _int(run_id, "run_id"), _int(step, "step", minimum=0)
        if not isinstance(metrics, Mapping):
            raise InvalidInput("metrics must be a dict {name: value}.")
        metrics = {k: v for k, v in metrics.items() if k != "step"}   # the step is the row key already
        names = [_str(k, "metric name") for k in metrics]
        values = [_float(v, f"metric {k!r}", optional=True) for k, v in metrics.items()]
        if not names:
            return

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute("INSERT OR REPLACE INTO run_metrics (run_id, step, name, value) "
                        "SELECT ?, ?, unnest(?::VARCHAR[]), unnest(?::DOUBLE[])", [rid, step, names, values]).fetchall()

        self._write(fn, f"the metrics of run {rid}", lambda cur, _: _scalar(
            cur, "SELECT count(*) FROM run_metrics WHERE run_id = ? AND step = ? AND name IN "
                 "(SELECT unnest(?::VARCHAR[]))", [rid, step, names]) == len(set(names)))

    def run_metrics(self, run_id: int) -> pd.DataFrame:
        """Wide: one row per step, column `step` plus one column per metric name."""
        df = self._df("SELECT step, name, value FROM run_metrics WHERE run_id = ? ORDER BY step, name",
                      [_int(run_id, "run_id")])
        if df.empty:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        wide = df.pivot(index="step", columns="name", values="value").reset_index()
        wide.columns.name = None
        return wide

    def add_run_samples(self, run_id: int, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Sample rollouts of a step: rows of {prompt, response, reward}."""
        rid, step = _int(run_id, "run_id"), _int(step, "step", minimum=0)
        prompts, responses, rewards = [], [], []
        for i, r in enumerate(rows, 1):
            if not isinstance(r, Mapping):
                raise InvalidInput(f"Sample {i} must be a dict with prompt, response and reward.")
            prompts.append(_str(r.get("prompt"), f"sample {i}: prompt", nonempty=False))
            responses.append(_str(r.get("response"), f"sample {i}: response", nonempty=False))
            rewards.append(_float(r.get("reward"), f"sample {i}: reward", optional=True))
        if not prompts:
            return

        def fn(cur):
            self._require_run(cur, rid)
            start = _scalar(cur, "SELECT coalesce(max(idx) + 1, 0) FROM run_samples WHERE run_id = ? AND step = ?",
                            [rid, step])
            cur.execute("INSERT INTO run_samples (run_id, step, idx, prompt, response, reward) "
                        "SELECT ?, ?, ? + unnest(range(?)), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), "
                        "unnest(?::DOUBLE[])", [rid, step, start, len(prompts), prompts, responses, rewards]).fetchall()
            return start

        self._write(fn, f"the samples of run {rid}", lambda cur, start: _scalar(
            cur, "SELECT count(*) FROM run_samples WHERE run_id = ? AND step = ? AND idx >= ?",
            [rid, step, start]) == len(prompts))

    def run_samples(self, run_id: int) -> pd.DataFrame:
        return self._df("SELECT step, idx, prompt, response, reward FROM run_samples WHERE run_id = ? "
                        "ORDER BY step, idx", [_int(run_id, "run_id")])

    # ------------------------------------------------------------ checkpoints
    def put_checkpoint(self, run_id: int, step: int, state: bytes) -> None:
        """Save a complete training checkpoint (one transaction); only the newest 2 steps per run are kept."""
        rid, step, state = _int(run_id, "run_id"), _int(step, "step", minimum=0), _bytes(state, "state")

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute("INSERT OR REPLACE INTO checkpoints (run_id, step, state) VALUES (?, ?, ?)",
                        [rid, step, state]).fetchall()
            cur.execute("DELETE FROM checkpoints WHERE run_id = ? AND step NOT IN "
                        "(SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step DESC LIMIT ?)",
                        [rid, rid, CHECKPOINTS_KEPT]).fetchall()

        def check(cur, _):
            steps = [r[0] for r in _rows(cur, "SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step DESC",
                                         [rid])]
            if len(steps) >= CHECKPOINTS_KEPT and step < steps[-1]:
                return True  # an older step than the kept ones: pruned at once by design
            return _scalar(cur, "SELECT octet_length(state) FROM checkpoints WHERE run_id = ? AND step = ?",
                           [rid, step]) == len(state)

        self._write(fn, f"the checkpoint of run {rid} at step {step}", check)

    def latest_checkpoint(self, run_id: int) -> tuple[int, bytes] | None:
        rows = self._rows("SELECT step, state FROM checkpoints WHERE run_id = ? ORDER BY step DESC LIMIT 1",
                          [_int(run_id, "run_id")])
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def checkpoints(self, run_id: int) -> pd.DataFrame:
        return self._df("SELECT run_id, step, octet_length(state) AS state_bytes, created_at FROM checkpoints "
                        "WHERE run_id = ? ORDER BY step", [_int(run_id, "run_id")])

    # ------------------------------------------------------------ adapters
    def add_adapter(self, name: str, weights: bytes, config: Mapping[str, Any] | None, base_model_id: str,
                    base_revision: str | None = None, run_id: int | None = None, step: int | None = None) -> int:
        values = [_int(run_id, "run_id", optional=True), _str(name, "name").strip(),
                  _int(step, "step", optional=True, minimum=0), _str(base_model_id, "base_model_id"),
                  _str(base_revision, "base_revision", optional=True), _to_json(dict(config or {})),
                  _bytes(weights, "weights")]

        def fn(cur):
            if values[0] is not None:
                self._require_run(cur, values[0])
            return cur.execute("INSERT INTO adapters (id, run_id, name, step, base_model_id, base_revision, config, "
                               "weights) VALUES (nextval('adapter_id_seq'), ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                               values).fetchall()[0][0]

        return self._write(fn, f"the adapter {values[1]!r}", lambda cur, aid: _count_ids(cur, "adapters", [aid]) == 1)

    def adapters(self) -> pd.DataFrame:
        df = self._df("SELECT id, run_id, name, step, base_model_id, base_revision, config, "
                      "octet_length(weights) AS weights_bytes, created_at FROM adapters ORDER BY id")
        return _parse_json_cols(df, ["config"])

    def adapter(self, adapter_id: int) -> dict:
        aid = _int(adapter_id, "adapter id")
        df = self._df("SELECT * FROM adapters WHERE id = ?", [aid])
        if df.empty:
            raise NotFound(f"no adapter with id {aid}")
        rec = self._records(_parse_json_cols(df, ["config"]))[0]
        rec["weights"] = bytes(rec["weights"])
        return rec

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
            src = _scalar(cur, "SELECT current_database()")
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
            n = {t: _scalar(cur, f"SELECT count(*) FROM {t}") for t in TABLES}
            con = duckdb.connect(target, read_only=True)
            try:
                return all(_scalar(con, f"SELECT count(*) FROM {t}") == c for t, c in n.items())
            finally:
                con.close()

        try:
            return self._write(fn, f"the backup {target}", check, transaction=False)
        except BaseException:
            for p in (tmp, tmp + ".wal"):
                if os.path.exists(p):
                    os.remove(p)
            raise

    def completion_texts(self, completion_ids: Sequence[int]) -> pd.DataFrame:
        """id, prompt, text for the given completions (the reward model's inputs)."""
        ids = _ids(completion_ids, "completion id")
        return self._df("SELECT c.id, p.text AS prompt, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id "
                        "WHERE c.id IN (SELECT unnest(?::BIGINT[]))", [ids])

    def completion_ids_without_features(self, model_revision: str) -> list[int]:
        df = self._df("SELECT id FROM completions WHERE id NOT IN (SELECT completion_id FROM features "
                      "WHERE model_revision = ?) ORDER BY id", [_str(model_revision, "model_revision")])
        return [int(i) for i in df["id"]]

    def unlabelled_pairs(self, prompt_id: int | None = None, limit: int = 2000) -> pd.DataFrame:
        """Pairs (a < b) of completions of one prompt that no current pairwise or ranking label covers yet,
        newest prompts first: the candidates for active learning."""
        cond = "" if prompt_id is None else " AND a.prompt_id = ?"
        params: list = [] if prompt_id is None else [_int(prompt_id, "prompt id")]
        return self._df(
            "WITH recent AS (SELECT id FROM prompts ORDER BY id DESC LIMIT 500), "
            "covered AS (SELECT least(chosen_id, rejected_id) AS x, greatest(chosen_id, rejected_id) AS y "
            "FROM preference_pairs) "
            "SELECT a.prompt_id, a.id AS a, b.id AS b FROM completions a JOIN completions b "
            "ON a.prompt_id = b.prompt_id AND a.id < b.id "
            "WHERE a.prompt_id IN (SELECT id FROM recent)" + cond +
            " AND NOT EXISTS (SELECT 1 FROM covered WHERE covered.x = a.id AND covered.y = b.id) "
            f"ORDER BY a.prompt_id DESC, a.id, b.id LIMIT {int(limit)}", params)

    def stats(self) -> dict[str, int]:
        """Row counts per table."""
        q = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in TABLES)
        return {t: int(n) for t, n in self._rows(q)}

    # ---- watch checks (the reward-hacking watch: migration 6)
    def add_watch_check(self, run_id: int, step: int, verdict: str, reason: str | None, signals: Mapping[str, Any],
                        examples: Mapping[str, Any] | None = None, best: bool = False,
                        adapter: bytes | None = None) -> int:
        """Store one watch check of a PPO run. With `adapter` (the policy at a new best check), that adapter is
        kept on this row and dropped from the run's older rows, in the same transaction."""
        rid, step = _int(run_id, "run_id"), _int(step, "step", minimum=0)
        if verdict not in ("ok", "pause"):
            raise InvalidInput(f"watch verdict must be 'ok' or 'pause', got {verdict!r}.")
        if not isinstance(signals, Mapping):
            raise InvalidInput("watch signals must be a dict {name: value}.")
        blob = None if adapter is None else _bytes(adapter, "adapter")
        values = [rid, step, verdict, _str(reason, "reason", optional=True, nonempty=False),
                  _to_json(dict(signals)), _to_json(dict(examples or {})), bool(best), blob]

        def fn(cur):
            self._require_run(cur, rid)
            if blob is not None:
                cur.execute("UPDATE watch_checks SET adapter = NULL WHERE run_id = ? AND adapter IS NOT NULL",
                            [rid]).fetchall()
            return cur.execute("INSERT INTO watch_checks (id, run_id, step, verdict, reason, signals, examples, "
                               "best, adapter) VALUES (nextval('watch_check_id_seq'), ?, ?, ?, ?, ?, ?, ?, ?) "
                               "RETURNING id", values).fetchall()[0][0]

        return self._write(fn, f"a watch check of run {rid}", lambda cur, cid: _scalar(
            cur, "SELECT count(*) FROM watch_checks WHERE id = ? AND octet_length(adapter) IS NOT DISTINCT FROM ?",
            [cid, None if blob is None else len(blob)]) == 1)

    def watch_checks(self, run_id: int) -> pd.DataFrame:
        """One row per check, oldest first: id, step, verdict, reason, best, has_adapter, paused_at, created_at,
        examples (dict) and every signal as its own column."""
        df = self._df("SELECT id, step, verdict, reason, best, adapter IS NOT NULL AS has_adapter, paused_at, "
                      "created_at, signals, examples FROM watch_checks WHERE run_id = ? ORDER BY id",
                      [_int(run_id, "run_id")])
        sig = pd.DataFrame([_from_json(s) or {} for s in df["signals"]], index=df.index)
        df = _parse_json_cols(df.drop(columns=["signals"]), ["examples"])
        return pd.concat([df, sig.drop(columns=[c for c in sig.columns if c in df.columns])], axis=1)

    def watch_best_adapter(self, run_id: int) -> tuple[int, bytes] | None:
        """(step, adapter bytes) of the run's best check so far, or None."""
        rows = self._rows("SELECT step, adapter FROM watch_checks WHERE run_id = ? AND adapter IS NOT NULL "
                          "ORDER BY id DESC LIMIT 1", [_int(run_id, "run_id")])
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def pause_run(self, run_id: int) -> None:
        """The watch paused the run: stored as 'cancelled' (resumable), its newest 'pause' check marked with the
        same timestamp, in one transaction; `run_pause` reads it back while nothing changed the run since."""
        rid = _int(run_id, "run_id")

        def fn(cur):
            self._require_run(cur, rid)
            cid = _scalar(cur, "SELECT max(id) FROM watch_checks WHERE run_id = ? AND verdict = 'pause'", [rid])
            if cid is None:
                raise InvalidInput(f"run {rid} has no watch check that asked for a pause.")
            cur.execute(f"UPDATE runs SET status = 'cancelled', error = NULL, updated_at = {NOW} WHERE id = ?",
                        [rid]).fetchall()
            cur.execute(f"UPDATE watch_checks SET paused_at = {NOW} WHERE id = ?", [cid]).fetchall()

        self._write(fn, f"the pause of run {rid}", lambda cur, _: self._pause_of(cur, rid) is not None)

    @staticmethod
    def _pause_of(cur, rid: int):
        rows = _rows(cur, "SELECT w.id FROM watch_checks w JOIN runs r ON r.id = w.run_id WHERE w.run_id = ? "
                          "AND r.status = 'cancelled' AND w.paused_at IS NOT NULL AND w.paused_at >= r.updated_at "
                          "ORDER BY w.id DESC LIMIT 1", [rid])
        return rows[0][0] if rows else None

    def run_pause(self, run_id: int) -> dict | None:
        """The watch check that paused this run, while that pause is the run's newest status (a resume, a
        cancel or a completion ends it); None otherwise."""
        rid = _int(run_id, "run_id")
        cid = self._pause_of(self._cur(), rid)
        if cid is None:
            return None
        df = self.watch_checks(rid)
        return self._records(df[df["id"] == cid])[0]

    def paused_run_ids(self) -> list[int]:
        """Runs whose newest status change is a pause by the watch."""
        return [int(r[0]) for r in self._rows(
            "SELECT DISTINCT w.run_id FROM watch_checks w JOIN runs r ON r.id = w.run_id WHERE r.status = "
            "'cancelled' AND w.paused_at IS NOT NULL AND w.paused_at >= r.updated_at ORDER BY 1")]

    def put_watch_judge(self, run_id: int, weights: bytes, pairs: int) -> None:
        """The run's second judge (written once; a resumed run reads it back)."""
        rid, blob, n = _int(run_id, "run_id"), _bytes(weights, "weights"), _int(pairs, "pairs", minimum=0)

        def fn(cur):
            self._require_run(cur, rid)
            cur.execute("INSERT OR REPLACE INTO watch_judges (run_id, weights, pairs) VALUES (?, ?, ?)",
                        [rid, blob, n]).fetchall()

        self._write(fn, f"the second judge of run {rid}", lambda cur, _: _scalar(
            cur, "SELECT octet_length(weights) FROM watch_judges WHERE run_id = ?", [rid]) == len(blob))

    def watch_judge(self, run_id: int) -> tuple[bytes, int] | None:
        rows = self._rows("SELECT weights, pairs FROM watch_judges WHERE run_id = ?", [_int(run_id, "run_id")])
        return (bytes(rows[0][0]), int(rows[0][1])) if rows else None
