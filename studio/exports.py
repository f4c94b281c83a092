"""Training-data exports and imports: pure functions of a `storage.Store` (Studio exposes them as methods).

Export — `export(store, kind, path, format="parquet")` returns the number of rows written:

kind="preference"  TRL's preference format, one row per row of `store.preference_pairs(criterion)` (the very
                   pairs the reward model trains on, same order): `prompt`, `chosen`, `rejected`, `margin`
                   (the view's margin: star difference for star-derived pairs, 1.0 for pairwise / ranking /
                   thumbs / rewrite pairs; TRL's RewardTrainer uses a `margin` column when present).
kind="unpaired"    KTO / BCO format: `prompt`, `completion`, `label` (bool), one row per current label:
                   thumbs up -> True, thumbs down -> False; stars >= 4 -> True, <= 2 -> False, 3 skipped.
kind="sft"         `prompt`, `completion`: every human rewrite, and every completion with a current 5-star
                   or thumbs-up label that no annotator labelled negative (thumbs-down or <= 2 stars) on the
                   same criterion; one row per completion.
kind="raw"         every table as it is: `path` is a folder, one file per table (`<folder>/<table>.<ext>`);
                   returns the total number of rows.

Shape: `conversational=False` writes plain text; `conversational=True` writes TRL's conversational form,
lists of {"role", "content"} messages: prompt = [{"role": "user", "content": ...}] (a multi-turn prompt
imported from HH-RLHF / conversational TRL data, stored as "Human: ...\\n\\nAssistant: ...\\n\\nAssistant:",
is split back into its user/assistant turns), chosen / rejected / completion = [{"role": "assistant", ...}].
`format` is the file format: "parquet" | "jsonl" (one JSON object per line) | "csv" (for spreadsheets: text
starting with =, +, -, @, tab or CR gets a leading ' so no spreadsheet runs it as a formula; messages become
JSON text). `metadata=True` (default) adds traceability columns (ids, kind, criterion, annotator, source, and
for preference pair_key / heldout / feedback_id); trainers ignore extra columns, pass metadata=False for the
bare TRL columns. `criterion`: a criterion name (default "overall"), None for every criterion, or (preference
only) {name: weight} exactly as `Store.preference_pairs`. `split` (preference only): None = all pairs,
"train" / "test" = the view's deterministic held-out split (`heldout` false / true).

Both file formats load with `datasets.load_dataset("parquet" | "json", data_files=path)`.

Import — one transaction each; a malformed file changes nothing and the error names the line/row and field:
`import_preferences(store, path, format="trl" | "hh")` TRL (plain or conversational, JSONL/Parquet) or HH-RLHF
pairs; `import_rated(store, path)` UltraFeedback-like rated completions (storage/io/rated.py has the file layout
and the score -> stars mapping). Both go through `storage.io` and turn its errors into StudioError.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from rlhf_studio.storage import InvalidInput, NotFound, StorageError
from rlhf_studio.storage import io as storage_io
from rlhf_studio.storage.io import export as _q

from .errors import StudioError

KINDS = _q.KINDS
FORMATS = _q.FORMATS


def export(store, kind: str, path: str, format: str = "parquet", *, conversational: bool = False,
           criterion: str | Mapping[str, float] | None = "overall", split: str | None = None,
           metadata: bool = True) -> int:
    """Write training data of `kind` ("preference" | "unpaired" | "sft" | "raw") to `path` as `format`
    ("parquet" | "jsonl" | "csv"). Returns the number of rows written. See the module doc for the columns."""
    if isinstance(format, str) and format.lower() in ("json", "ndjson"):
        format = "jsonl"
    try:
        return _q.export(store, kind, os.fspath(path), format, conversational=conversational, criterion=criterion,
                         split=split, metadata=metadata)
    except (InvalidInput, NotFound) as e:
        raise StudioError(str(e)) from None
    except StorageError as e:
        raise StudioError(str(e)) from None


def _nothing_imported(e: Exception) -> StudioError:
    msg = str(e)
    return StudioError(msg + ("" if "nothing was imported" in msg else " — nothing was imported"))


def import_preferences(store, path: str, format: str = "trl", criterion: str = "overall",
                       source: str | None = None) -> int:
    """Import preference pairs (TRL plain or conversational JSONL/Parquet, or HH-RLHF JSONL(.gz)) in one
    transaction. Returns the number of pairs added (pairs already imported from the same source are skipped).
    Rows keep the source 'import:<format>:<file>' (completions, label annotator and label source), the same
    as Studio.import_preferences, which also starts the feature job of the reward model."""
    path = os.fspath(path)
    if format not in ("trl", "hh"):
        raise StudioError("format must be 'trl' (prompt/chosen/rejected) or 'hh' (HH-RLHF)")
    if not os.path.isfile(path):
        raise StudioError(f"no such file: {path}")
    name = os.path.basename(path)
    try:
        return storage_io.import_preferences(store, path, format, criterion=criterion, source=source)
    except (InvalidInput, NotFound) as e:
        msg = str(e)
        raise _nothing_imported(msg if msg.startswith(name) else f"{name}: {msg}") from None


def import_rated(store, path: str, criterion: str = "overall", scale: str = "auto",
                 source: str | None = None) -> dict[str, Any]:
    """Import rated completions ({"prompt", "completions": [{"text"|"response", "score"|"rating"}]} per row,
    JSONL or Parquet) as prompts, completions (source 'import:<file>') and star labels, in one transaction.
    scale: "auto" | "5" (1..5, rounded) | "10" (0..10, halved and rounded). Returns {"prompts", "completions",
    "labels", "skipped", "scale", "source"}."""
    try:
        return storage_io.import_rated(store, path, criterion=criterion, scale=scale, source=source)
    except (InvalidInput, NotFound) as e:
        raise _nothing_imported(e) from None
