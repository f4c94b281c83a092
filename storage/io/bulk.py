"""The one bulk writer: many rows in ONE verified transaction on the writer thread.

- `write_imported`: labels brought in from a file together with the completions they judge (and the prompts,
  reused when the text exists). Each item has a key (stored as the label's idempotency key); an item whose key is
  already stored is skipped, so importing the same file twice adds nothing. `write_pairs` (HH, TRL, any
  {prompt, chosen, rejected} rows) and `write_rated` (rated completions -> star labels) are built on it.
- `write_prompts`: prompt texts (a text already stored is reused).
- `add_feedback_many`: labels on completions that already exist (another tool's labels, benchmarks).
Every function validates all rows first; one bad row raises InvalidInput / NotFound naming it, and nothing is
written.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, NamedTuple, Sequence

from .. import db
from ..errors import InvalidInput, NotFound
from ..validate import FEEDBACK_COLS, clean_prompt, criterion_name, import_source, normalise_feedback, valid_unicode

BULK_KINDS = ("stars", "thumbs", "pairwise", "ranking", "critique")
_CHUNK = 255            # rows per INSERT (parameter lists; see storage.db.bulk_insert)
_TYPES = {"kind": "VARCHAR", "criterion": "VARCHAR", "prompt_id": "BIGINT", "completion_id": "BIGINT",
          "other_completion_id": "BIGINT", "stars": "INTEGER", "up": "BOOLEAN", "winner": "VARCHAR",
          "ranking": "BIGINT[]", "text": "VARCHAR", "tags": "VARCHAR[]", "rewrite_completion_id": "BIGINT",
          "annotator": "VARCHAR", "session_id": "VARCHAR", "idempotency_key": "VARCHAR", "source": "VARCHAR"}


class Imported(NamedTuple):
    """One imported label: its key, the prompt, the completion texts it judges (one, or two for a pair: the
    label's completion_id and other_completion_id), and the label's own columns ({"kind": "stars", "stars": 4})."""
    key: str
    prompt: str
    texts: tuple[str, ...]
    label: Mapping[str, Any]


def import_key(source: str, *parts: str) -> str:
    """The idempotency key of an imported label: the source and a hash of what makes the label the same."""
    return source + ":" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _require_criterion(cur, criterion: str) -> None:
    if not db.rows(cur, "SELECT 1 FROM criteria WHERE name = ?", [criterion]):
        raise InvalidInput(f"Unknown criterion {criterion!r}; add it first.")


def write_imported(store, source: str, criterion: str, items: Sequence[Imported], what: str
                   ) -> tuple[list[int], list[int]]:
    """Write the items not stored yet (see the module doc): prompts, completions (source `source`) and labels
    (annotator = source = `source`). Returns (completion ids, label ids) added."""
    keys = [it.key for it in items]
    label_cols = sorted({c for it in items for c in it.label})

    def fn(cur):
        _require_criterion(cur, criterion)
        done = {r[0] for r in db.rows(cur, "SELECT idempotency_key FROM feedback WHERE idempotency_key IN "
                                           "(SELECT unnest(?::VARCHAR[]))", [keys])} if keys else set()
        todo = [it for it in items if it.key not in done]
        if not todo:
            return [], []
        pids = db.prompt_ids(cur, [it.prompt for it in todo], source)
        cids = iter(db.alloc_ids(cur, "completion_id_seq", sum(len(it.texts) for it in todo)))
        fids = db.alloc_ids(cur, "feedback_id_seq", len(todo))
        judged = [[next(cids) for _ in it.texts] for it in todo]   # ids in item order
        flat = [(cid, pid, text) for it, pid, ids in zip(todo, pids, judged) for cid, text in zip(ids, it.texts)]
        db.bulk_insert(cur, "completions", {
            "id": ("BIGINT", [c for c, _, _ in flat]),
            "prompt_id": ("BIGINT", [p for _, p, _ in flat]),
            "text": ("VARCHAR", [t for _, _, t in flat]),
            "source": ("VARCHAR", [source] * len(flat))})
        n = len(todo)
        cols = {"id": ("BIGINT", fids), "criterion": ("VARCHAR", [criterion] * n), "prompt_id": ("BIGINT", pids),
                "completion_id": ("BIGINT", [ids[0] for ids in judged])}
        if any(len(ids) > 1 for ids in judged):
            cols["other_completion_id"] = ("BIGINT", [ids[1] if len(ids) > 1 else None for ids in judged])
        cols.update({c: (_TYPES[c], [it.label.get(c) for it in todo]) for c in label_cols})
        cols.update({"annotator": ("VARCHAR", [source] * n), "idempotency_key": ("VARCHAR", [it.key for it in todo]),
                     "source": ("VARCHAR", [source] * n)})
        db.bulk_insert(cur, "feedback", cols)
        return [c for c, _, _ in flat], fids

    def check(cur, res):
        cids, fids = res
        return (db.count_ids(cur, "completions", cids) == len(cids)
                and db.count_ids(cur, "feedback", fids) == len(fids))

    return store.write_transaction(fn, what, check)


def write_prompts(store, texts: Sequence[str], source: str, what: str = "the prompts") -> list[int]:
    """Ids of the (already cleaned) prompt texts, inserting the missing ones with `source`."""
    if not texts:
        return []
    return store.write_transaction(lambda cur: db.prompt_ids(cur, list(texts), source), what,
                                   lambda cur, ids: db.count_ids(cur, "prompts", ids) == len(set(ids)))


def write_pairs(store, rows: Sequence[Mapping[str, str]], source: str, criterion: str = "overall") -> int:
    """{prompt, chosen, rejected} rows as pairwise labels (A = chosen, winner 'a'); rows whose chosen equals
    rejected, and rows already imported from the same source (same texts), are skipped. Returns the number of
    pairs added."""
    src = import_source(source)
    criterion = criterion_name(criterion)
    items: dict[str, Imported] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise InvalidInput(f"Pair {i} must be a dict with prompt, chosen and rejected.")
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(k), str):
                raise InvalidInput(f"Pair {i}: {k} must be text, got {type(row.get(k)).__name__}.")
        p = clean_prompt(row["prompt"], f"Pair {i}: the prompt")
        for k in ("chosen", "rejected"):
            valid_unicode(row[k], f"Pair {i}: {k}")
        if row["chosen"] == row["rejected"]:
            continue
        key = import_key(src, criterion, p, row["chosen"], row["rejected"])
        items.setdefault(key, Imported(key, p, (row["chosen"], row["rejected"]), {"kind": "pairwise", "winner": "a"}))
    _, fids = write_imported(store, src, criterion, list(items.values()), f"the pairs from {src}")
    return len(fids)


def write_rated(store, rows: Sequence[Mapping[str, Any]], source: str, criterion: str = "overall"
                ) -> dict[str, int]:
    """Rows of `storage.io.rated.read_rated_file` ({"prompt", "completions": [{"text", "stars"}]}) as star
    labels. Returns {"completions", "labels" added, "skipped": already imported or repeated}."""
    source = import_source(source)
    criterion = criterion_name(criterion)
    items: dict[str, Imported] = {}
    repeated = 0
    for r in rows:
        for c in r["completions"]:
            key = import_key(source, "rated", criterion, r["prompt"], c["text"])
            if key in items:
                repeated += 1
                continue
            items[key] = Imported(key, r["prompt"], (c["text"],), {"kind": "stars", "stars": c["stars"]})
    cids, fids = write_imported(store, source, criterion, list(items.values()),
                                f"the rated completions from {source}")
    return {"completions": len(cids), "labels": len(fids), "skipped": repeated + len(items) - len(fids)}


def _normalise(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One label checked and normalised as Store.add_feedback does (messages prefixed with `where`)."""
    try:
        return normalise_feedback(fields, BULK_KINDS)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}") from None


def add_feedback_many(store, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Add many labels in one verified transaction. Returns their ids, in order.

    Each row is what `Store.add_feedback(**row)` takes, for the kinds stars, thumbs, pairwise, ranking and
    critique (a rewrite adds a completion: use `Store.add_rewrite`). A row whose idempotency key is already stored
    is not added again (its existing id is returned, as `add_feedback` does); a key repeated within `rows` is an
    error. Labels are added in the order given (ids increase), so a later label supersedes an earlier one with the
    same (kind, criterion, annotator, target), exactly as when they are added one by one."""
    labels = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise InvalidInput(f"Label {i} must be a dict of label fields, got {type(row).__name__}.")
        labels.append(_normalise(row, f"Label {i}"))
    if not labels:
        return []
    keys = [f["idempotency_key"] for f in labels if f["idempotency_key"] is not None]
    if len(set(keys)) != len(keys):
        raise InvalidInput("An idempotency key appears twice among the labels.")

    def fn(cur):
        known = {r[0]: r[1] for r in db.rows(cur, "SELECT idempotency_key, id FROM feedback WHERE idempotency_key IN "
                                                  "(SELECT unnest(?::VARCHAR[]))", [keys])} if keys else {}
        criteria = {f["criterion"] for f in labels}
        have = {r[0] for r in db.rows(cur, "SELECT name FROM criteria WHERE name IN (SELECT unnest(?::VARCHAR[]))",
                                    [sorted(criteria)])}
        missing = sorted(criteria - have)
        if missing:
            raise InvalidInput(f"Unknown criterion {missing[0]!r}; add it first.")
        targets = sorted({c for f in labels for c in
                          (f["ranking"] if f["kind"] == "ranking" else
                           [x for x in (f["completion_id"], f["other_completion_id"]) if x is not None])})
        prompt_of = dict(db.rows(cur, "SELECT id, prompt_id FROM completions WHERE id IN "
                                      "(SELECT unnest(?::BIGINT[]))", [targets]))
        todo = []
        for i, f in enumerate(labels, 1):
            if f["idempotency_key"] in known:
                continue
            ts = f["ranking"] if f["kind"] == "ranking" else [
                c for c in (f["completion_id"], f["other_completion_id"]) if c is not None]
            for c in ts:
                if c not in prompt_of:
                    raise NotFound(f"Label {i}: no completion with id {c}")
            prompts = {prompt_of[c] for c in ts}
            if len(prompts) > 1:
                what = "pairwise label" if f["kind"] == "pairwise" else "ranking"
                raise InvalidInput(f"Label {i}: all completions of a {what} must answer the same prompt.")
            pid = prompts.pop()
            if f["prompt_id"] is not None and f["prompt_id"] != pid:
                raise InvalidInput(f"Label {i}: prompt_id {f['prompt_id']} does not match the completion's "
                                   f"prompt {pid}.")
            f["prompt_id"] = pid
            todo.append(i - 1)
        ids = db.alloc_ids(cur, "feedback_id_seq", len(todo))
        for s0 in range(0, len(todo), _CHUNK):
            part = todo[s0:s0 + _CHUNK]
            cols = {"id": ("BIGINT", ids[s0:s0 + _CHUNK])}
            cols.update({c: (_TYPES[c], [labels[j][c] for j in part]) for c in FEEDBACK_COLS})
            db.bulk_insert(cur, "feedback", cols)
        out = []
        new = iter(ids)
        for f in labels:
            out.append(known[f["idempotency_key"]] if f["idempotency_key"] in known else next(new))
        return out, ids

    def check(cur, res):
        _, ids = res
        return db.count_ids(cur, "feedback", ids) == len(ids)

    out, _ = store.write_transaction(fn, f"{len(labels)} labels", check)
    return out
