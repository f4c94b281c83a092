"""Files out: training data exports (DuckDB only; nothing here writes to the database).

Exports read the SAME views the reward model trains from, so the two never disagree:
- preference rows come from `PAIRS_SQL` over the `preference_pairs` view (exactly what
  `Store.preference_pairs(criterion)` returns, one exported row per pair, in the same order);
- unpaired and SFT rows come from the `feedback_current` view.
Files are written by DuckDB itself (`COPY (query) TO file`), streaming, to `<path>.partial` first and then
renamed, so a failed export never leaves half a file under the final name. studio/exports.py documents the
columns of each kind.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import duckdb

from ..base import TABLES
from ..errors import InvalidInput, StorageError, short
from ..labels import PAIRS_SQL, criteria_weights

FORMATS = ("parquet", "jsonl", "csv")
KINDS = ("preference", "unpaired", "sft", "raw")
_EXT = {"parquet": "parquet", "jsonl": "jsonl", "csv": "csv"}
_COPY = {"parquet": "(FORMAT parquet, COMPRESSION zstd)", "jsonl": "(FORMAT json)",
         "csv": "(FORMAT csv, HEADER true)"}
RAW_TABLES = ("schema_version",) + TABLES

# unpaired (KTO) labels from stars: >= STARS_GOOD -> True, <= STARS_BAD -> False, in between skipped
STARS_GOOD, STARS_BAD = 4, 2
# SFT: a completion rated 5 stars or thumbs-up, and not labelled negative (thumbs-down / <= STARS_BAD) by anyone
SFT_STARS = 5

_FORMULA_START = "('=', '+', '-', '@', chr(9), chr(13))"


# ------------------------------------------------------------------------------------------------ helpers
def _criteria(store, criterion: str | Mapping[str, float] | None) -> tuple[list[str], list[float]]:
    """(names, weights) as Store.preference_pairs understands them; None = every criterion, weight 1."""
    if criterion is None:
        names = [r[0] for r in store.query_rows("SELECT name FROM criteria ORDER BY name")]
        return names, [1.0] * len(names)
    return criteria_weights(criterion)


def _neutralise(expr: str) -> str:
    """SQL: text a spreadsheet would run as a formula gets a leading single quote."""
    return f"CASE WHEN left({expr}, 1) IN {_FORMULA_START} THEN '''' || {expr} ELSE {expr} END"


def _csv_select(columns: Sequence[tuple[str, str]]) -> str:
    """SELECT list turning (name, duckdb type) columns into spreadsheet-safe CSV cells: text neutralised,
    lists/structs/JSON as JSON text, blobs as base64, numbers/booleans/timestamps unchanged."""
    out = []
    for name, typ in columns:
        q = f'"{name}"'
        t = typ.upper()
        if t == "BLOB":
            out.append(f"base64({q}) AS {q}")
        elif t.endswith("]") or t.startswith(("STRUCT", "MAP", "UNION")):
            out.append(f"{_neutralise(f'to_json({q})::VARCHAR')} AS {q}")
        elif t in ("VARCHAR", "JSON") or t.startswith("VARCHAR"):
            out.append(f"{_neutralise(f'{q}::VARCHAR')} AS {q}")
        else:
            out.append(q)
    return ", ".join(out)


def _json_select(columns: Sequence[tuple[str, str]]) -> str:
    """JSON lines: blobs as base64 (DuckDB would write byte escapes), JSON columns as nested values."""
    out = []
    for name, typ in columns:
        q = f'"{name}"'
        if typ.upper() == "BLOB":
            out.append(f"base64({q}) AS {q}")
        else:
            out.append(q)
    return ", ".join(out)


def _describe(cur, sql: str, params: Sequence[Any]) -> list[tuple[str, str]]:
    rows = cur.execute(f"DESCRIBE {sql}", list(params)).fetchall()
    return [(r[0], r[1]) for r in rows]


def _check_target(path: str) -> str:
    target = os.path.realpath(os.path.expanduser(os.fspath(path)))
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise InvalidInput(f"Cannot write {target}: the folder {folder} does not exist.")
    if os.path.isdir(target):
        raise InvalidInput(f"Cannot write {target}: it is a folder; give a file name.")
    return target


def copy_query(store, sql: str, params: Sequence[Any], path: str, format: str) -> int:
    """Write the result of a read-only query to `path` (parquet | jsonl | csv) through DuckDB's COPY, first to
    `<path>.partial`, then renamed. Returns the number of rows written."""
    if format not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    target = _check_target(path)
    if target == store.path:
        raise InvalidInput("The export file must differ from the database file.")
    tmp = target + ".partial"
    cur = store.read_cursor()
    try:
        cols = _describe(cur, sql, params)
        if format == "csv":
            sql = f"SELECT {_csv_select(cols)} FROM ({sql})"
        elif format == "jsonl":
            sql = f"SELECT {_json_select(cols)} FROM ({sql})"
        n = cur.execute(f"COPY ({sql}) TO ? {_COPY[format]}", list(params) + [tmp]).fetchall()[0][0]
        os.replace(tmp, target)
        return int(n)
    except duckdb.Error as e:
        raise StorageError(f"Exporting to {target} failed: {short(e)}") from None
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------ exports
def _conversational(expr: str, role: str) -> str:
    """SQL: a text as a list of {role, content} messages. A prompt in the HH multi-turn form that the TRL/HH
    importers write ("Human: ...\\n\\nAssistant: ...\\n\\nAssistant:") is split back into its turns."""
    if role != "user":
        return f"[{{'role': '{role}', 'content': {expr}}}]"
    nl2 = "chr(10) || chr(10)"
    split = (f"list_transform(list_filter(string_split(replace(replace({nl2} || left({expr}, length({expr}) - 12), "
             f"{nl2} || 'Human: ', chr(30) || 'user' || chr(31)), {nl2} || 'Assistant: ', "
             f"chr(30) || 'assistant' || chr(31)), chr(30)), lambda x: x <> ''), "
             f"lambda x: {{'role': split_part(x, chr(31), 1), 'content': substr(x, strpos(x, chr(31)) + 1)}})")
    return (f"CASE WHEN starts_with({expr}, 'Human: ') AND suffix({expr}, {nl2} || 'Assistant:') "
            f"THEN {split} ELSE [{{'role': 'user', 'content': {expr}}}] END")


def preference_sql(store, criterion: str | Mapping[str, float] | None = "overall",
                   conversational: bool = False, split: str | None = None,
                   metadata: bool = True) -> tuple[str, list]:
    """SQL + params of the preference export: one row per row of Store.preference_pairs(criterion), same
    order. Columns prompt, chosen, rejected, margin (+ ids, kind, criterion, annotator, source, pair_key,
    heldout, feedback_id with metadata). split: None (all), 'train' (heldout = false), 'test' (heldout)."""
    names, weights = _criteria(store, criterion)
    if split not in (None, "train", "test"):
        raise InvalidInput(f"split must be None, 'train' or 'test', got {split!r}.")
    text = {"prompt": "pr.text", "chosen": "ch.text", "rejected": "rj.text"}
    if conversational:
        text = {"prompt": _conversational("pr.text", "user"), "chosen": _conversational("ch.text", "assistant"),
                "rejected": _conversational("rj.text", "assistant")}
    meta = (", p.prompt_id, p.chosen_id, p.rejected_id, p.kind, p.criterion, p.annotator, p.source, "
            "p.pair_key, p.heldout, p.feedback_id") if metadata else ""
    where = {None: "", "train": " WHERE NOT p.heldout", "test": " WHERE p.heldout"}[split]
    sql = (f"SELECT {text['prompt']} AS prompt, {text['chosen']} AS chosen, {text['rejected']} AS rejected, "
           f"p.margin{meta} FROM ({PAIRS_SQL}) p "
           "JOIN prompts pr ON pr.id = p.prompt_id JOIN completions ch ON ch.id = p.chosen_id "
           f"JOIN completions rj ON rj.id = p.rejected_id{where} "
           "ORDER BY p.feedback_id, p.chosen_id, p.rejected_id, p.criterion")
    return sql, [names, weights]


def unpaired_sql(store, criterion: str | None = "overall", conversational: bool = False,
                 metadata: bool = True) -> tuple[str, list]:
    """KTO-style rows from current labels: thumbs up -> True, down -> False; stars >= 4 -> True, <= 2 -> False,
    3 stars skipped. One row per label (several annotators of one completion give several rows)."""
    names, _ = _criteria(store, criterion)
    prompt = _conversational("pr.text", "user") if conversational else "pr.text"
    completion = _conversational("c.text", "assistant") if conversational else "c.text"
    meta = (", f.kind, f.stars, f.criterion, f.annotator, f.source, f.prompt_id, f.completion_id, "
            "f.id AS feedback_id") if metadata else ""
    sql = (f"SELECT {prompt} AS prompt, {completion} AS completion, "
           f"CASE WHEN f.kind = 'thumbs' THEN f.up ELSE f.stars >= {STARS_GOOD} END AS label{meta} "
           "FROM feedback_current f JOIN completions c ON c.id = f.completion_id "
           "JOIN prompts pr ON pr.id = f.prompt_id "
           "WHERE f.criterion IN (SELECT unnest(?::VARCHAR[])) AND (f.kind = 'thumbs' OR (f.kind = 'stars' AND "
           f"(f.stars >= {STARS_GOOD} OR f.stars <= {STARS_BAD}))) ORDER BY f.id")
    return sql, [names]


def sft_sql(store, criterion: str | None = "overall", conversational: bool = False,
            metadata: bool = True) -> tuple[str, list]:
    """prompt/completion rows: every current human rewrite (any criterion), and every completion with a current
    5-star or thumbs-up label on the criterion; a completion that anyone labelled negative on the criterion
    (thumbs-down or <= 2 stars) is left out. One row per completion, by completion id."""
    names, _ = _criteria(store, criterion)
    prompt = _conversational("pr.text", "user") if conversational else "pr.text"
    completion = _conversational("c.text", "assistant") if conversational else "c.text"
    meta = (", c.prompt_id, c.id AS completion_id, k.origin, k.n_positive, c.source AS completion_source"
            if metadata else "")
    sql = f"""
        WITH cur AS (SELECT * FROM feedback_current),
        crit AS (SELECT * FROM cur WHERE criterion IN (SELECT unnest(?::VARCHAR[]))),
        negative AS (SELECT DISTINCT completion_id FROM crit
                     WHERE (kind = 'thumbs' AND NOT up) OR (kind = 'stars' AND stars <= {STARS_BAD})),
        cand AS (
            SELECT rewrite_completion_id AS completion_id, 'rewrite' AS origin FROM cur WHERE kind = 'rewrite'
            UNION ALL SELECT completion_id, 'stars' FROM crit WHERE kind = 'stars' AND stars >= {SFT_STARS}
            UNION ALL SELECT completion_id, 'thumbs' FROM crit WHERE kind = 'thumbs' AND up
        ),
        k AS (SELECT completion_id, string_agg(DISTINCT origin, ',' ORDER BY origin) AS origin,
                     count(*) AS n_positive
              FROM cand WHERE completion_id NOT IN (SELECT completion_id FROM negative) GROUP BY completion_id)
        SELECT {prompt} AS prompt, {completion} AS completion{meta}
        FROM k JOIN completions c ON c.id = k.completion_id JOIN prompts pr ON pr.id = c.prompt_id
        ORDER BY c.id"""
    return sql, [names]


def _table_order(cur, table: str) -> str:
    cols = [r[0] for r in cur.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [table]).fetchall()]
    if "id" in cols:
        return " ORDER BY id"
    key = [c for c in ("version", "run_id", "model_revision", "completion_id", "step", "idx", "name") if c in cols]
    return (" ORDER BY " + ", ".join(key)) if key else ""


def export_raw(store, folder: str, format: str = "parquet") -> dict[str, int]:
    """Every table as it is, one file per table `<folder>/<table>.<ext>` (the folder is created). Returns
    {table: rows}. Blobs (adapter weights, checkpoints) are kept in Parquet, base64 text in JSONL/CSV."""
    folder = os.path.realpath(os.path.expanduser(os.fspath(folder)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InvalidInput(f"Cannot write the raw export to {folder}: it is a file; give a folder.")
    if not os.path.isdir(os.path.dirname(folder)):
        raise InvalidInput(f"Cannot write {folder}: the folder {os.path.dirname(folder)} does not exist.")
    os.makedirs(folder, exist_ok=True)
    cur = store.read_cursor()
    out = {}
    for t in RAW_TABLES:
        out[t] = copy_query(store, f"SELECT * FROM {t}{_table_order(cur, t)}", [],
                            os.path.join(folder, f"{t}.{_EXT[format]}"), format)
    return out


def export(store, kind: str, path: str, format: str = "parquet", *, conversational: bool = False,
           criterion: str | Mapping[str, float] | None = "overall", split: str | None = None,
           metadata: bool = True) -> int:
    """See studio.exports.export. Returns the number of rows written (raw: all tables together)."""
    if kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    if format not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    if kind == "raw":
        return sum(export_raw(store, path, format).values())
    if kind == "preference":
        sql, params = preference_sql(store, criterion, conversational, split, metadata)
    else:
        if isinstance(criterion, Mapping):
            raise InvalidInput(f"The {kind} export takes one criterion name (or None for all), not weights.")
        if split is not None:
            raise InvalidInput("split applies to the preference export only.")
        sql, params = (unpaired_sql if kind == "unpaired" else sft_sql)(store, criterion, conversational, metadata)
    return copy_query(store, sql, params, path, format)
