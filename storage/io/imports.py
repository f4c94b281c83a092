"""Files in: each import reads its file with the reader of its format, then writes the rows with the bulk
writer, in one transaction. A malformed file changes nothing; the error (InvalidInput, FileFormatError) names
the file, the line or row and the field."""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidInput
from ..validate import as_str, clean_prompt, import_source
from .bulk import write_pairs, write_prompts, write_rated
from .preferences import read_hh, read_trl
from .prompts import read_prompt_file
from .rated import read_rated_file

PREFERENCE_FORMATS = {"hh": read_hh, "trl": read_trl}


def read_prompts(path) -> list[str]:
    """The prompts of a .txt/.jsonl/.csv/.parquet file, cleaned as `Store.add_prompts` cleans them."""
    rows = read_prompt_file(path)
    name = os.path.basename(os.fspath(path))
    unit = "row" if name.lower().endswith(".parquet") else "line"
    return [clean_prompt(t, f"{name}, {unit} {n}: the prompt") for n, t in rows]


def import_prompts(store, path, source: str | None = None) -> int:
    """Import a prompt file in one transaction (prompts already present are reused, not duplicated). Returns the
    number of prompts in the file; `source` defaults to 'import:<file name>'."""
    name = os.path.basename(os.fspath(path))
    prompts = read_prompts(path)
    source = as_str(source, "source").strip() if source is not None else f"import:{name}"
    write_prompts(store, prompts, source, f"the prompts of {name}")
    return len(prompts)


def import_preferences(store, path, format: str = "trl", criterion: str = "overall",
                       source: str | None = None) -> int:
    """Import preference pairs: `format` "trl" (TRL plain or conversational, JSONL/Parquet) or "hh" (HH-RLHF
    JSONL(.gz)). Rows keep the source 'import:<format>:<file>' unless `source` is given. Returns the number of
    pairs added (pairs already imported from the same source are skipped)."""
    read = PREFERENCE_FORMATS.get(format)
    if read is None:
        raise InvalidInput(f"format must be one of {', '.join(PREFERENCE_FORMATS)}, got {format!r}.")
    rows = read(path)
    name = os.path.basename(os.fspath(path))
    return write_pairs(store, rows, source or f"import:{format}:{name}", criterion)


def import_rated(store, path, criterion: str = "overall", scale: str = "auto",
                 source: str | None = None) -> dict[str, Any]:
    """Import a rated-completions file (`storage.io.rated`) as prompts, completions and star labels. Returns
    {"prompts": distinct prompts in the file, "completions", "labels" added, "skipped": already imported or
    repeated, "scale": the scale used, "source"}."""
    rows, scale = read_rated_file(path, scale)
    src = import_source(source if source is not None else os.path.basename(os.fspath(path)))
    out = write_rated(store, rows, src, criterion)
    return {"prompts": len({r["prompt"] for r in rows}), **out, "scale": scale, "source": src}
