"""The corpus: prompts and the completions that answer them."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import pandas as pd

from . import db
from .base import StoreBase
from .errors import InvalidInput, NotFound
from .io import bulk, imports
from .validate import as_float, as_ids, as_int, as_str, clean_prompt

FINISH_REASONS = ("eos", "length", "stop", "human")
COMPLETION_COLS = ("prompt_id", "text", "source", "model_id", "model_revision", "adapter_id", "params", "seed",
                   "prompt_tokens", "completion_tokens", "finish_reason", "latency_s", "corrects_id")


def completion_row(row: Mapping[str, Any], where: str) -> list[Any]:
    """One completion's column values (in COMPLETION_COLS order), checked; `where` prefixes the messages."""
    if not isinstance(row, Mapping):
        raise InvalidInput(f"{where} must be a dict.")
    unknown = set(row) - set(COMPLETION_COLS)
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
        as_int(r.get("prompt_id"), f"{where}: prompt_id"),
        as_str(r["text"], f"{where}: text", nonempty=False),
        source,
        as_str(r.get("model_id"), f"{where}: model_id", optional=True),
        as_str(r.get("model_revision"), f"{where}: model_revision", optional=True),
        as_int(r.get("adapter_id"), f"{where}: adapter_id", optional=True),
        db.to_json(r.get("params")),
        as_int(r.get("seed"), f"{where}: seed", optional=True),
        as_int(r.get("prompt_tokens"), f"{where}: prompt_tokens", optional=True, minimum=0),
        as_int(r.get("completion_tokens"), f"{where}: completion_tokens", optional=True, minimum=0),
        r.get("finish_reason"),
        as_float(r.get("latency_s"), f"{where}: latency_s", optional=True),
        as_int(r.get("corrects_id"), f"{where}: corrects_id", optional=True),
    ]


def insert_completions(cur, values: list[list[Any]]) -> list[int]:
    """Insert completion rows (from completion_row) inside a write, after checking what they refer to."""
    prompt_ids = sorted({v[0] for v in values})
    missing = set(prompt_ids) - {r[0] for r in db.rows(
        cur, "SELECT id FROM prompts WHERE id IN (SELECT unnest(?::BIGINT[]))", [prompt_ids])}
    if missing:
        raise NotFound(f"no prompt with id {min(missing)}")
    corrects = sorted({v[12] for v in values if v[12] is not None})
    if corrects:
        found = {r[0] for r in db.rows(cur, "SELECT id FROM completions WHERE id IN "
                                            "(SELECT unnest(?::BIGINT[]))", [corrects])}
        if set(corrects) - found:
            raise NotFound(f"no completion with id {min(set(corrects) - found)}")
    adapters = sorted({v[5] for v in values if v[5] is not None})
    if adapters:
        found = {r[0] for r in db.rows(cur, "SELECT id FROM adapters WHERE id IN (SELECT unnest(?::BIGINT[]))",
                                       [adapters])}
        if set(adapters) - found:
            raise NotFound(f"no adapter with id {min(set(adapters) - found)}")
    cols = ", ".join(COMPLETION_COLS)
    marks = ", ".join("?" for _ in COMPLETION_COLS)
    sql = f"INSERT INTO completions (id, {cols}) VALUES (nextval('completion_id_seq'), {marks}) RETURNING id"
    return [cur.execute(sql, v).fetchall()[0][0] for v in values]


class Corpus(StoreBase):
    """Prompts and completions (a generation writes both in one transaction)."""

    # ------------------------------------------------------------ prompts
    def add_prompt(self, text: str, source: str = "manual") -> int:
        return self.add_prompts([text], source)[0]

    def add_prompts(self, texts: Sequence[str], source: str = "manual") -> list[int]:
        if isinstance(texts, str):
            raise InvalidInput("add_prompts expects a list of texts, not one string.")
        texts = list(texts)
        clean = [clean_prompt(t, f"Prompt {i}" if len(texts) > 1 else "The prompt") for i, t in
                 enumerate(texts, 1)]
        source = as_str(source, "source").strip()
        return self._insert_prompts(clean, source, "the prompts" if len(clean) > 1 else "the prompt")

    def _insert_prompts(self, clean: list[str], source: str, what: str) -> list[int]:
        return bulk.write_prompts(self, clean, source, what)

    def import_prompts(self, path: str | os.PathLike, source: str | None = None) -> int:
        """Import a .txt/.jsonl/.csv/.parquet prompt file in one transaction. Returns the number of prompts
        in the file (prompts already present are reused, not duplicated). source defaults to 'import:<name>'."""
        return imports.import_prompts(self, path, source)

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
        annotator = as_str(annotator, "annotator", optional=True)
        rows = self._rows("""
            SELECT p.id, p.text FROM prompts p
            LEFT JOIN (SELECT prompt_id, count(*) AS n, bool_or(annotator = ?) AS mine
                       FROM feedback_current GROUP BY prompt_id) f ON f.prompt_id = p.id
            ORDER BY coalesce(f.mine, false), coalesce(f.n, 0), p.id
            LIMIT 1""", [annotator])
        return {"id": rows[0][0], "text": rows[0][1]} if rows else None

    def add_completions(self, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        values = [completion_row(r, f"Completion {i}") for i, r in enumerate(rows, 1)]
        if not values:
            return []
        return self._write(lambda cur: insert_completions(cur, values),
                           "the completions" if len(values) > 1 else "the completion",
                           lambda cur, ids: db.count_ids(cur, "completions", ids) == len(ids))

    def add_generation(self, prompt: str, rows: Sequence[Mapping[str, Any]], source: str = "manual"
                       ) -> tuple[int, list[int]]:
        """A prompt (reused if present) and the completions generated for it, in ONE transaction: a refused
        completion leaves no prompt behind without its completions. `rows` as for add_completions, without
        prompt_id. Returns (prompt_id, completion ids)."""
        text = clean_prompt(prompt, "The prompt")
        source = as_str(source, "source").strip()
        values = [completion_row({**r, "prompt_id": 0}, f"Completion {i}") if isinstance(r, Mapping)
                  else completion_row(r, f"Completion {i}") for i, r in enumerate(rows, 1)]

        def fn(cur):
            pid = db.prompt_ids(cur, [text], source)[0]
            for v in values:
                v[0] = pid
            return pid, insert_completions(cur, values) if values else []

        return self._write(fn, "the prompt and its completions", lambda cur, res: db.count_ids(
            cur, "prompts", [res[0]]) == 1 and db.count_ids(cur, "completions", res[1]) == len(res[1]))

    def add_completion(self, **row: Any) -> int:
        return self.add_completions([row])[0]

    _COMPLETION_SELECT = ("SELECT id, prompt_id, text, source, model_id, model_revision, adapter_id, params, seed, "
                          "prompt_tokens, completion_tokens, finish_reason, latency_s, corrects_id, created_at "
                          "FROM completions")

    def get_completion(self, completion_id: int) -> dict:
        cid = as_int(completion_id, "completion_id")
        df = self._df(self._COMPLETION_SELECT + " WHERE id = ?", [cid])
        if df.empty:
            raise NotFound(f"no completion with id {cid}")
        return db.records(db.parse_json_cols(df, ["params"]))[0]

    def completions(self, prompt_id: int | None = None) -> pd.DataFrame:
        if prompt_id is None:
            df = self._df(self._COMPLETION_SELECT + " ORDER BY id")
        else:
            df = self._df(self._COMPLETION_SELECT + " WHERE prompt_id = ? ORDER BY id",
                          [as_int(prompt_id, "prompt_id")])
        return db.parse_json_cols(df, ["params"])

    def completion_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM completions")[0][0])

    def completion_texts(self, completion_ids: Sequence[int]) -> pd.DataFrame:
        """id, prompt, text for the given completions (the reward model's inputs)."""
        ids = as_ids(completion_ids, "completion id")
        return self._df("SELECT c.id, p.text AS prompt, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id "
                        "WHERE c.id IN (SELECT unnest(?::BIGINT[]))", [ids])
