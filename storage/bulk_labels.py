"""Many labels in one transaction: bulk loads (another tool's labels, benchmarks) without one write per label.

`add_feedback_many(store, rows)` takes what `Store.add_feedback(**row)` takes, for the kinds stars, thumbs,
pairwise, ranking and critique (a rewrite adds a completion: use `Store.add_rewrite`), and keeps the Store's
write contract: ONE transaction on the writer thread, returning only after COMMIT and a read-back check of the
new ids. All rows are validated first: one bad row (unknown kind, field that does not apply, missing or
foreign completion, completions of different prompts, unknown criterion) raises `InvalidInput` / `NotFound`
naming the row (1-based) and nothing is written. A row whose idempotency key is already stored is not added
again (its existing id is returned, as `add_feedback` does); a key repeated within `rows` is an error.
Labels are added in the order given (ids increase), so a later label supersedes an earlier one with the same
(kind, criterion, annotator, target), exactly as when they are added one by one.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .errors import InvalidInput, NotFound
from .store import Store, _FEEDBACK_COLS, _alloc_ids, _bulk_insert, _count_ids, _rows, normalise_feedback

BULK_KINDS = ("stars", "thumbs", "pairwise", "ranking", "critique")
_CHUNK = 255            # rows per INSERT (parameter lists; see storage.store._bulk_insert)
_TYPES = {"kind": "VARCHAR", "criterion": "VARCHAR", "prompt_id": "BIGINT", "completion_id": "BIGINT",
          "other_completion_id": "BIGINT", "stars": "INTEGER", "up": "BOOLEAN", "winner": "VARCHAR",
          "ranking": "BIGINT[]", "text": "VARCHAR", "tags": "VARCHAR[]", "rewrite_completion_id": "BIGINT",
          "annotator": "VARCHAR", "session_id": "VARCHAR", "idempotency_key": "VARCHAR", "source": "VARCHAR"}


def _normalise(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One row checked and normalised as Store.add_feedback does (messages prefixed with `where`)."""
    try:
        return normalise_feedback(fields, BULK_KINDS)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}") from None


def add_feedback_many(store: Store, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Add many labels in one verified transaction (see the module doc). Returns their ids, in order."""
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
        known = {r[0]: r[1] for r in _rows(cur, "SELECT idempotency_key, id FROM feedback WHERE idempotency_key IN "
                                                "(SELECT unnest(?::VARCHAR[]))", [keys])} if keys else {}
        criteria = {f["criterion"] for f in labels}
        have = {r[0] for r in _rows(cur, "SELECT name FROM criteria WHERE name IN (SELECT unnest(?::VARCHAR[]))",
                                    [sorted(criteria)])}
        missing = sorted(criteria - have)
        if missing:
            raise InvalidInput(f"Unknown criterion {missing[0]!r}; add it first.")
        targets = sorted({c for f in labels for c in
                          (f["ranking"] if f["kind"] == "ranking" else
                           [x for x in (f["completion_id"], f["other_completion_id"]) if x is not None])})
        prompt_of = dict(_rows(cur, "SELECT id, prompt_id FROM completions WHERE id IN "
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
        ids = _alloc_ids(cur, "feedback_id_seq", len(todo))
        for s0 in range(0, len(todo), _CHUNK):
            part = todo[s0:s0 + _CHUNK]
            cols = {"id": ("BIGINT", ids[s0:s0 + _CHUNK])}
            cols.update({c: (_TYPES[c], [labels[j][c] for j in part]) for c in _FEEDBACK_COLS})
            _bulk_insert(cur, "feedback", cols)
        out = []
        new = iter(ids)
        for f in labels:
            out.append(known[f["idempotency_key"]] if f["idempotency_key"] in known else next(new))
        return out, ids

    def check(cur, res):
        _, ids = res
        return _count_ids(cur, "feedback", ids) == len(ids)

    out, _ = store._write(fn, f"{len(labels)} labels", check)
    return out
