"""Rated-completions files (UltraFeedback-like) read into prompts with scored completions and star labels.

File: JSONL (optionally gzip-compressed) or Parquet, one row per prompt:
    {"prompt": str, "completions": [{"text": str, "score": number}, ...]}
Accepted aliases: "instruction" for "prompt" (UltraFeedback); "response" for "text"; "rating" or
"overall_score" for "score". Other fields are ignored.

Scores become star labels 1..5 (one mapping per file, so that all its rows stay comparable):
    scale "5"  : scores on 1..5 are rounded half up (4.5 -> 5, 2.4 -> 2);
    scale "10" : scores on 0..10 / 1..10 are halved and rounded half up, then clipped to 1..5
                 (10 -> 5, 9 -> 5, 8 -> 4, 7 -> 4, 6 -> 3, 5 -> 3, 4 -> 2, 3 -> 2, 2 -> 1, 1 -> 1, 0 -> 1);
    scale "auto" (default): "5" when every score of the file lies in 1..5, else "10" when every score lies in
                 0..10, else the import fails naming the first score outside 0..10.
(A 1..10 file whose scores all happen to fall in 1..5 would be read as "5": pass scale="10" for such files.)

What `storage.io.imports.import_rated` writes, all in ONE transaction (a malformed file changes nothing; the
error names the file, the line (JSONL, 1-based) or row (Parquet, 1-based) and the field, e.g.
"completions[2].score"):
- the prompt (reused when the same text exists; a new one gets source 'import:<file>');
- each completion with source 'import:<file>';
- a 'stars' label per completion, annotator = source = 'import:<file>', on the given criterion. Because all
  labels of a file share one annotator, the `preference_pairs` view turns them into pairs within each prompt
  (margin = star difference), exactly as for a human who rated every completion of a prompt.
A completion already imported from the same source (same criterion, prompt and text) is skipped, so
importing the same file twice adds nothing; the same text twice under one prompt of a file is kept once
(the first score counts).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from ..errors import InvalidInput
from ..validate import clean_prompt, valid_unicode
from .records import existing_file, read_records

SCALES = ("auto", "5", "10")
_PROMPT_KEYS = ("prompt", "instruction")
_TEXT_KEYS = ("text", "response")
_SCORE_KEYS = ("score", "rating", "overall_score")


def _first(obj: dict, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in obj), None)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        try:
            return _number(v.item())
        except (TypeError, ValueError):
            return None
    return None


def to_stars(score: float, scale: str) -> int:
    """Map one score to 1..5 stars on a resolved scale ("5" or "10"), rounding half up."""
    x = score if scale == "5" else score / 2.0
    return int(min(5, max(1, math.floor(x + 0.5))))


def read_rated_file(path, scale: str = "auto") -> tuple[list[dict], str]:
    """Parse and validate a rated-completions file. Returns ([{"prompt", "completions": [{"text", "score",
    "stars"}]}], resolved scale). Raises InvalidInput naming the file, line/row and field."""
    if scale not in SCALES:
        raise InvalidInput(f"scale must be one of {', '.join(SCALES)}, got {scale!r}.")
    name = os.path.basename(existing_file(path))
    rows = []
    lo_where = None  # (where, field, value) of the first score outside 1..5 / 0..10
    out_of_10 = None
    for where, obj in read_records(path, 'a JSON object with "prompt" and "completions"'):
        pk = _first(obj, _PROMPT_KEYS)
        if pk is None:
            raise InvalidInput(f"{where}: field 'prompt' is missing.")
        prompt = obj[pk]
        if not isinstance(prompt, str):
            raise InvalidInput(f"{where}: field '{pk}' must be text, got {type(prompt).__name__}.")
        prompt = clean_prompt(prompt, f"{where}: field '{pk}'")
        comps = obj.get("completions")
        if hasattr(comps, "tolist"):
            comps = comps.tolist()
        if not isinstance(comps, list) or not comps:
            got = "missing" if comps is None else (
                "empty" if isinstance(comps, list) else f"{type(comps).__name__}, not a list")
            raise InvalidInput(f"{where}: field 'completions' must be a non-empty list of "
                               f"{{\"text\", \"score\"}} objects ({got}).")
        items = []
        for j, c in enumerate(comps, 1):
            fld = f"completions[{j}]"
            if not isinstance(c, dict):
                raise InvalidInput(f"{where}: field '{fld}' must be an object with text and score, got "
                                   f"{type(c).__name__}.")
            tk = next((k for k in _TEXT_KEYS if c.get(k) is not None), None)
            if tk is None:
                raise InvalidInput(f"{where}: field '{fld}.text' is missing.")
            text = c[tk]
            if not isinstance(text, str):
                raise InvalidInput(f"{where}: field '{fld}.{tk}' must be text, got {type(text).__name__}.")
            if not text.strip():
                raise InvalidInput(f"{where}: field '{fld}.{tk}' is empty.")
            valid_unicode(text, f"{where}: field '{fld}.{tk}'")
            sk = next((k for k in _SCORE_KEYS if c.get(k) is not None), None)
            if sk is None:
                raise InvalidInput(f"{where}: field '{fld}.score' is missing.")
            score = _number(c[sk])
            if score is None or not math.isfinite(score):
                raise InvalidInput(f"{where}: field '{fld}.{sk}' must be a number, got {c[sk]!r}.")
            if lo_where is None and not 1 <= score <= 5:
                lo_where = (where, f"{fld}.{sk}", score)
            if out_of_10 is None and not 0 <= score <= 10:
                out_of_10 = (where, f"{fld}.{sk}", score)
            items.append({"text": text, "score": score})
        rows.append({"prompt": prompt, "completions": items})
    if not rows:
        raise InvalidInput(f"{name}: no rated completions found in the file.")
    if scale == "auto":
        scale = "5" if lo_where is None else "10"
    bad = lo_where if scale == "5" else out_of_10
    if bad is not None:
        where, fld, v = bad
        rng = "1..5" if scale == "5" else "0..10"
        raise InvalidInput(f"{where}: field '{fld}' is {v:g}, outside the {rng} scale"
                           + (" (scores must be on 1..5 or 0..10)." if scale == "10" else "."))
    for r in rows:
        for c in r["completions"]:
            c["stars"] = to_stars(c["score"], scale)
    return rows, scale
