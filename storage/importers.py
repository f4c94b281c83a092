"""Reading prompt files (.txt, .jsonl, .csv, .parquet) into (line_number, text) rows.

Every problem raises InvalidInput naming the file, the 1-based line (or parquet row) and what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import os

import duckdb

from .errors import InvalidInput

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
_KEYS = ("prompt", "text")


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidInput(f"{os.path.basename(path)}, line {line}: the text is not valid UTF-8.") from None


def _clean(path: str, where: str, value) -> str:
    name = os.path.basename(path)
    if value is None:
        raise InvalidInput(f"{name}, {where}: the prompt is missing.")
    if not isinstance(value, str):
        raise InvalidInput(f"{name}, {where}: the prompt must be text, got {type(value).__name__}.")
    if not value.strip():
        raise InvalidInput(f"{name}, {where}: the prompt is empty.")
    return value.strip()


def read_prompt_file(path) -> list[tuple[int, str]]:
    path = os.fspath(path)
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise InvalidInput(f"{name}: unsupported file type {ext or '(none)'}; use one of {', '.join(FORMATS)}.")
    if not os.path.isfile(path):
        raise InvalidInput(f"The file {path} does not exist.")
    if ext == ".parquet":
        rows = _read_parquet(path)
    else:
        with open(path, "rb") as fh:
            text = _decode(path, fh.read())
        rows = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}[ext](path, text)
    if not rows:
        raise InvalidInput(f"{name}: no prompts found in the file.")
    return rows


def _read_txt(path: str, text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_jsonl(path: str, text: str) -> list[tuple[int, str]]:
    name = os.path.basename(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{name}, line {n}: not valid JSON ({e.msg}).") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f'{name}, line {n}: expected a JSON object with a "prompt" or "text" field.')
        key = next((k for k in _KEYS if k in obj), None)
        if key is None:
            raise InvalidInput(f'{name}, line {n}: the object has no "prompt" or "text" field.')
        rows.append((n, _clean(path, f"line {n}", obj[key])))
    return rows


def _read_csv(path: str, text: str) -> list[tuple[int, str]]:
    name = os.path.basename(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise InvalidInput(f"{name}, line 1: {e}.") from None
    cols = [h.strip().lower() for h in header]
    key = next((k for k in _KEYS if k in cols), None)
    if key is None:
        raise InvalidInput(f'{name}, line 1: the header has no "prompt" or "text" column.')
    col = cols.index(key)
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise InvalidInput(f"{name}, line {start}: {e}.") from None
        if not rec:
            continue  # blank line
        if len(rec) != len(header):
            raise InvalidInput(f"{name}, line {start}: expected {len(header)} fields, found {len(rec)}.")
        rows.append((start, _clean(path, f"line {start}", rec[col])))
    return rows


def _read_parquet(path: str) -> list[tuple[int, str]]:
    name = os.path.basename(path)
    con = duckdb.connect(":memory:")
    try:
        try:
            cols = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()]
        except duckdb.Error as e:
            raise InvalidInput(f"{name}: cannot read the parquet file ({' '.join(str(e).split())[:200]}).") from None
        low = [c.lower() for c in cols]
        key = next((k for k in _KEYS if k in low), None)
        if key is None:
            raise InvalidInput(f'{name}: no "prompt" or "text" column (columns: {", ".join(cols)}).')
        col = cols[low.index(key)]
        values = [r[0] for r in con.execute(f'SELECT "{col}" FROM read_parquet(?)', [path]).fetchall()]
    finally:
        con.close()
    return [(n, _clean(path, f"row {n}", v)) for n, v in enumerate(values, 1)]
