"""The one reader of record files: JSONL (optionally gzip-compressed) and Parquet, as (position, dict) rows.

Every format reader of `storage.io` starts here, so a file's problems read the same whatever its format:
`FileFormatError` names the file, the 1-based line (JSONL) or row (Parquet) and, where known, the field.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import Iterator

import duckdb

from ..errors import InvalidInput, short

PARQUET_SUFFIXES = (".parquet", ".pq")


class FileFormatError(InvalidInput):
    """A file to import is malformed; `line` (JSONL) or `row` (Parquet) and `field` say where."""

    def __init__(self, message: str, *, line: int | None = None, row: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.line, self.row, self.field = line, row, field


class Position:
    """Where a record sits in its file: "<file>, line N" (JSONL) or "<file>, row N" (Parquet)."""

    def __init__(self, name: str, unit: str, number: int):
        self.name, self.unit, self.number = name, unit, number

    def __str__(self) -> str:
        return f"{self.name}, {self.unit} {self.number}"

    def error(self, message: str, field: str | None = None) -> FileFormatError:
        """FileFormatError "<file>, line N: <message>" carrying the line/row number and the field."""
        return FileFormatError(f"{self}: {message}", field=field, **{self.unit: self.number})


def is_parquet(path: str) -> bool:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return magic == b"PAR1" or path.lower().endswith(PARQUET_SUFFIXES)


def existing_file(path) -> str:
    """The path as a string; FileFormatError when there is no such file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"The file {path} does not exist.")
    return path


def read_text(path: str) -> str:
    """A text file's content (gzip-compressed or not, a UTF-8 byte-order mark dropped); invalid UTF-8 raises
    FileFormatError naming the line."""
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise FileFormatError(f"{name}: could not be read ({e}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FileFormatError(f"{name}, line {line}: the text is not valid UTF-8.", line=line) from None


def jsonl_records(path: str, expected: str = "a JSON object") -> Iterator[tuple[Position, dict]]:
    """(position, object) for each non-blank line of a JSONL(.gz) file; a line that is not a JSON object raises
    FileFormatError ("expected <expected>")."""
    name = os.path.basename(path)
    for n, line in enumerate(io.StringIO(read_text(path), newline=None), 1):
        if not line.strip():
            continue
        at = Position(name, "line", n)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise at.error(f"not valid JSON ({e.msg}, column {e.colno}).") from None
        if not isinstance(obj, dict):
            raise at.error(f"expected {expected}, got {type(obj).__name__}.")
        yield at, obj


def parquet_records(path: str, columns: tuple[str, ...] = ()) -> Iterator[tuple[Position, dict]]:
    """(position, row as a dict) for each row of a Parquet file. `columns`: the columns that must exist (the
    first missing one raises FileFormatError naming it)."""
    name = os.path.basename(path)
    con = duckdb.connect(":memory:")
    try:
        try:
            cur = con.execute("SELECT * FROM read_parquet(?)", [path])
            cols = [d[0] for d in cur.description]
            for c in columns:
                if c not in cols:
                    raise FileFormatError(f"{name}: column {c!r} is missing (columns: {', '.join(cols)}).", field=c)
            values = cur.fetchall()
        except duckdb.Error as e:
            raise FileFormatError(f"{name}: cannot read the parquet file ({short(e, 200)}).") from None
    finally:
        con.close()
    for i, r in enumerate(values, 1):
        yield Position(name, "row", i), dict(zip(cols, r))


def read_records(path, expected: str = "a JSON object", columns: tuple[str, ...] = ()
                 ) -> list[tuple[Position, dict]]:
    """All records of a JSONL(.gz) or Parquet file (Parquet by its magic bytes or its suffix)."""
    path = existing_file(path)
    if is_parquet(path):
        return list(parquet_records(path, columns))
    return list(jsonl_records(path, expected))
