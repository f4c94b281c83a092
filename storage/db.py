"""SQL plumbing shared by the store's aggregates: run a query on a cursor, allocate ids, insert many rows, JSON.

Functions of a DuckDB cursor (every result fetched completely); they run inside a write (`Store._write`) or on
a read cursor. Validation of values lives in `storage.validate`.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InvalidInput


def jsonable(o: Any) -> Any:
    if o is None or isinstance(o, (str, bool, int)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, np.generic):
        return jsonable(o.item())
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    raise InvalidInput(f"A value of type {type(o).__name__} cannot be stored as JSON.")


def to_json(o: Any) -> str | None:
    return None if o is None else json.dumps(jsonable(o), allow_nan=False)


def from_json(s: Any) -> Any:
    if s is None or (isinstance(s, float) and math.isnan(s)) or s is pd.NA:
        return None
    return json.loads(s) if isinstance(s, str) else s


def parse_json_cols(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    for c in cols:
        if c in df.columns:
            df[c] = pd.Series([from_json(v) for v in df[c]], index=df.index, dtype=object)
    return df


def rows(cur, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
    return cur.execute(sql, params or []).fetchall()


def scalar(cur, sql: str, params: Sequence[Any] | None = None) -> Any:
    found = rows(cur, sql, params)
    return found[0][0] if found else None


def alloc_ids(cur, sequence: str, n: int) -> list[int]:
    if n == 0:
        return []
    return sorted(r[0] for r in rows(cur, f"SELECT nextval('{sequence}') FROM range(?)", [n]))


FRAME_MIN_ROWS = 256  # below this, lists bound as parameters are faster than registering a DataFrame


def bulk_insert(cur, table: str, cols: dict[str, tuple[str, list]]) -> None:
    """INSERT many rows: cols maps column -> (DuckDB type, values); all value lists have the same length."""
    n = len(next(iter(cols.values()))[1])
    if n == 0:
        return
    names = ", ".join(cols)
    if n < FRAME_MIN_ROWS:  # parallel unnest zips the lists
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


def existing_prompts(cur, texts: list[str]) -> dict[str, int]:
    if len(texts) < FRAME_MIN_ROWS:
        return dict(rows(cur, "SELECT text, id FROM prompts WHERE text IN (SELECT unnest(?::VARCHAR[]))", [texts]))
    name = f"_storage_texts_{threading.get_ident()}"
    cur.register(name, pd.DataFrame({"text": pd.Series(texts, dtype=object)}))
    try:
        return dict(rows(cur, f"SELECT p.text, p.id FROM prompts p JOIN {name} t ON p.text = t.text"))
    finally:
        cur.unregister(name)


def count_ids(cur, table: str, ids: Sequence[int], col: str = "id") -> int:
    return scalar(cur, f"SELECT count(*) FROM {table} WHERE {col} IN (SELECT unnest(?::BIGINT[]))", [list(ids)])


def prompt_ids(cur, texts: Sequence[str], source: str) -> list[int]:
    """Ids of the (already cleaned) prompt texts, inserting the missing ones; runs inside a write."""
    uniq = list(dict.fromkeys(texts))
    have = existing_prompts(cur, uniq)
    new = [t for t in uniq if t not in have]
    if new:
        ids = alloc_ids(cur, "prompt_id_seq", len(new))
        bulk_insert(cur, "prompts", {"id": ("BIGINT", ids), "text": ("VARCHAR", new),
                                     "source": ("VARCHAR", [source] * len(new))})
        have.update(zip(new, ids))
    return [have[t] for t in texts]


def records(df: pd.DataFrame) -> list[dict]:
    """The rows of a DataFrame as dicts of plain Python values (None for missing, datetime for timestamps)."""
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
