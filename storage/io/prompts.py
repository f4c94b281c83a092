"""Prompt files (.txt, .jsonl, .csv, .parquet) read into (line or row number, text) rows.

Every problem raises FileFormatError naming the file, the 1-based line (or parquet row) and what is wrong.
"""

from __future__ import annotations

import csv
import io
import os

import duckdb

from ..errors import short
from .records import FileFormatError, existing_file, jsonl_records, read_text

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
_KEYS = ("prompt", "text")


def _clean(name: str, where: str, value) -> str:
    if value is None:
        raise FileFormatError(f"{name}, {where}: the prompt is missing.")
    if not isinstance(value, str):
        raise FileFormatError(f"{name}, {where}: the prompt must be text, got {type(value).__name__}.")
    if not value.strip():
        raise FileFormatError(f"{name}, {where}: the prompt is empty.")
    return value.strip()


def read_prompt_file(path) -> list[tuple[int, str]]:
    """[(line or row number, prompt text)] of a prompt file; the format follows the file's suffix."""
    path = os.fspath(path)
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise FileFormatError(f"{name}: unsupported file type {ext or '(none)'}; use one of {', '.join(FORMATS)}.")
    path = existing_file(path)
    if ext == ".parquet":
        rows = _read_parquet(path)
    elif ext == ".jsonl":
        rows = _read_jsonl(path)
    else:
        text = read_text(path)
        rows = _read_txt(text) if ext == ".txt" else _read_csv(name, text)
    if not rows:
        raise FileFormatError(f"{name}: no prompts found in the file.")
    return rows


def _read_txt(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_jsonl(path: str) -> list[tuple[int, str]]:
    rows = []
    for at, obj in jsonl_records(path, 'a JSON object with a "prompt" or "text" field'):
        key = next((k for k in _KEYS if k in obj), None)
        if key is None:
            raise at.error('the object has no "prompt" or "text" field.')
        rows.append((at.number, _clean(at.name, f"line {at.number}", obj[key])))
    return rows


def _read_csv(name: str, text: str) -> list[tuple[int, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise FileFormatError(f"{name}, line 1: {e}.", line=1) from None
    cols = [h.strip().lower() for h in header]
    key = next((k for k in _KEYS if k in cols), None)
    if key is None:
        raise FileFormatError(f'{name}, line 1: the header has no "prompt" or "text" column.', line=1)
    col = cols.index(key)
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise FileFormatError(f"{name}, line {start}: {e}.", line=start) from None
        if not rec:
            continue  # blank line
        if len(rec) != len(header):
            raise FileFormatError(f"{name}, line {start}: expected {len(header)} fields, found {len(rec)}.",
                                  line=start)
        rows.append((start, _clean(name, f"line {start}", rec[col])))
    return rows


def _read_parquet(path: str) -> list[tuple[int, str]]:
    """Only the prompt column is read (a wide file's other columns are never decoded)."""
    name = os.path.basename(path)
    con = duckdb.connect(":memory:")
    try:
        try:
            cols = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()]
        except duckdb.Error as e:
            raise FileFormatError(f"{name}: cannot read the parquet file ({short(e, 200)}).") from None
        low = [c.lower() for c in cols]
        key = next((k for k in _KEYS if k in low), None)
        if key is None:
            raise FileFormatError(f'{name}: no "prompt" or "text" column (columns: {", ".join(cols)}).')
        col = cols[low.index(key)]
        values = [r[0] for r in con.execute(f'SELECT "{col}" FROM read_parquet(?)', [path]).fetchall()]
    finally:
        con.close()
    return [(n, _clean(name, f"row {n}", v)) for n, v in enumerate(values, 1)]
