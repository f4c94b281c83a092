"""Labels and criteria: feedback, its withdrawals (retractions) and the preference pairs compiled from it."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from . import db
from .base import StoreBase
from .corpus import insert_completions
from .errors import InvalidInput, NotFound
from .io import bulk
from .validate import (FEEDBACK_COLS, FEEDBACK_KINDS, as_float, as_int, as_str, criterion_name,
                       normalise_feedback)

# the pairs of some criteria with their weights: params [names], [weights] (Labels.preference_pairs, exports)
PAIRS_SQL = """
    SELECT p.prompt_id, p.chosen_id, p.rejected_id, p.margin * w.weight AS margin, p.kind, p.feedback_id,
           p.criterion, p.annotator, p.source, p.pair_key, p.heldout
    FROM preference_pairs p
    JOIN (SELECT unnest(?::VARCHAR[]) AS criterion, unnest(?::DOUBLE[]) AS weight) w
      ON p.criterion = w.criterion"""


def criteria_weights(criterion: str | Mapping[str, float]) -> tuple[list[str], list[float]]:
    """A criterion name, or {name: weight}, as (names, weights); weights must be positive."""
    if isinstance(criterion, str):
        return [criterion], [1.0]
    if not isinstance(criterion, Mapping) or not criterion:
        raise InvalidInput("criterion must be a name or a non-empty dict {name: weight}.")
    names, weights = [], []
    for name, w in criterion.items():
        w = as_float(w, f"weight of {name!r}")
        if not math.isfinite(w) or w <= 0:
            raise InvalidInput(f"The weight of criterion {name!r} must be a positive number, got {w}.")
        names.append(str(name))
        weights.append(w)
    return names, weights


class Labels(StoreBase):
    """Criteria, labels, withdrawals and preference pairs."""

    # ------------------------------------------------------------ criteria
    def add_criterion(self, name: str, description: str = "") -> str:
        name = criterion_name(name)
        description = as_str(description, "description", nonempty=False) if description is not None else ""

        def fn(cur):
            cur.execute("INSERT INTO criteria (name, description) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET description = excluded.description",
                        [name, description]).fetchall()
            return name

        self._write(fn, f"criterion {name!r}", lambda cur, _: db.scalar(
            cur, "SELECT count(*) FROM criteria WHERE name = ? AND description = ?", [name, description]) == 1)
        return name

    def criteria(self) -> pd.DataFrame:
        return self._df("SELECT name, description, created_at FROM criteria ORDER BY created_at, name")

    # ------------------------------------------------------------ feedback
    def add_feedback(self, **fields: Any) -> int:
        """Add one label. Returns the feedback id (for kind='rewrite' pass rewrite_text; see add_rewrite)."""
        return self._add_feedback(fields)[0]

    def add_rewrite(self, completion_id: int, text: str, **meta: Any) -> tuple[int, int]:
        """A human rewrite of a completion: adds the human completion and the 'rewrite' label in one
        transaction. Returns (feedback_id, new_completion_id)."""
        fb, new = self._add_feedback({**meta, "kind": "rewrite", "completion_id": completion_id,
                                      "rewrite_text": text})
        return fb, new

    def _add_feedback(self, fields: dict[str, Any]) -> tuple[int, int | None]:
        f = normalise_feedback(fields)
        kind, rewrite_text = f["kind"], fields.get("rewrite_text") if f["kind"] == "rewrite" else None

        def fn(cur):
            key = f["idempotency_key"]
            if key is not None:
                same = ("kind", "criterion", "completion_id", "other_completion_id", "stars", "up", "winner",
                        "ranking", "text", "tags", "annotator")
                hit = db.rows(cur, f"SELECT id, rewrite_completion_id, {', '.join(same)}, (SELECT text FROM "
                                   "completions WHERE id = rewrite_completion_id) FROM feedback "
                                   "WHERE idempotency_key = ?", [key])
                if hit:
                    # a retry says the same again; the same key on another label would drop that label unseen
                    stored = dict(zip(same + ("rewrite_text",), hit[0][2:]))
                    asked = {c: f[c] for c in same} | {"rewrite_text": rewrite_text.strip() if rewrite_text else None}
                    for c in ("ranking", "tags"):
                        stored[c] = list(stored[c]) if stored[c] is not None else None
                    if stored != asked:
                        raise InvalidInput(f"The idempotency key {key!r} was already used for another label "
                                           f"(#{hit[0][0]}); use a new key for a new label.")
                    return hit[0][0], hit[0][1], True
            if not db.rows(cur, "SELECT 1 FROM criteria WHERE name = ?", [f["criterion"]]):
                raise InvalidInput(f"Unknown criterion {f['criterion']!r}; add it first.")
            targets = f["ranking"] if kind == "ranking" else [
                c for c in (f["completion_id"], f["other_completion_id"]) if c is not None]
            prompt_of = dict(db.rows(cur, "SELECT id, prompt_id FROM completions WHERE id IN "
                                          "(SELECT unnest(?::BIGINT[]))", [targets]))
            for c in targets:
                if c not in prompt_of:
                    raise NotFound(f"no completion with id {c}")
            prompts = {prompt_of[c] for c in targets}
            if len(prompts) > 1:
                what = "pairwise label" if kind == "pairwise" else "ranking"
                raise InvalidInput(f"All completions of a {what} must answer the same prompt.")
            pid = prompts.pop()
            if f["prompt_id"] is not None and f["prompt_id"] != pid:
                raise InvalidInput(f"prompt_id {f['prompt_id']} does not match the completion's prompt {pid}.")
            f["prompt_id"] = pid
            if kind == "rewrite":
                f["rewrite_completion_id"] = insert_completions(cur, [[
                    pid, rewrite_text.strip(), "human", None, None, None, None, None, None, None, "human", None,
                    f["completion_id"]]])[0]
            cols = ", ".join(FEEDBACK_COLS)
            marks = ", ".join("?::BIGINT[]" if c == "ranking" else "?::VARCHAR[]" if c == "tags" else "?"
                              for c in FEEDBACK_COLS)
            fid = cur.execute(f"INSERT INTO feedback (id, {cols}) VALUES (nextval('feedback_id_seq'), {marks}) "
                              "RETURNING id", [f[c] for c in FEEDBACK_COLS]).fetchall()[0][0]
            return fid, f["rewrite_completion_id"], False

        def check(cur, res):
            fid, new_cid, _ = res
            if db.scalar(cur, "SELECT count(*) FROM feedback WHERE id = ?", [fid]) != 1:
                return False
            return new_cid is None or db.scalar(cur, "SELECT count(*) FROM completions WHERE id = ?", [new_cid]) == 1

        fid, new_cid, _ = self._write(fn, f"the {kind} label", check)
        return fid, new_cid

    def feedback(self, history: bool = False, kind: str | None = None, annotator: str | None = None) -> pd.DataFrame:
        """Current labels (the latest not withdrawn per kind, criterion, annotator and target); history=True:
        every label with `superseded` (a later label replaced it) and `retracted` (it was withdrawn) columns."""
        if kind is not None and kind not in FEEDBACK_KINDS:
            raise InvalidInput(f"Unknown feedback kind {kind!r}; use one of {', '.join(FEEDBACK_KINDS)}.")
        view = "feedback_history" if history else "feedback_current"
        return self._df(f"SELECT * FROM {view} WHERE (? IS NULL OR kind = ?) AND (? IS NULL OR annotator = ?) "
                        "ORDER BY id", [kind, kind, annotator, annotator])

    # ------------------------------------------------------------ withdrawing labels
    def retract_feedback(self, feedback_id: int, *, annotator: str = "local", own_only: bool = False,
                         session_id: str | None = None, reason: str | None = None,
                         idempotency_key: str | None = None) -> dict:
        """Withdraw one label (a mislabel). The label stays in the history, marked `retracted`; whatever label it
        had replaced is current again. `own_only`: refuse a label given by another annotator. Returns what
        `undo_last_feedback` returns."""
        fid = as_int(feedback_id, "feedback id")
        return self._retract(lambda cur: fid, annotator, own_only, session_id, reason, idempotency_key)

    def undo_last_feedback(self, annotator: str = "local", session_id: str | None = None,
                           idempotency_key: str | None = None) -> dict:
        """Withdraw the newest label that `annotator` gave (in `session_id` only, when given) and has not
        withdrawn yet. Returns {"retraction_id", "label": the withdrawn label (a feedback_history row as a
        dict), "restored_id": the label current again in its place, or None}."""
        who = as_str(annotator, "annotator")
        session = as_str(session_id, "session id", optional=True)

        def newest(cur):
            rows = db.rows(cur, "SELECT id FROM feedback_live WHERE annotator = ? AND source = 'human' "
                                "AND (?::VARCHAR IS NULL OR session_id = ?) ORDER BY id DESC LIMIT 1",
                           [who, session, session])
            if not rows:
                raise NotFound("Nothing to undo: you have no label left to withdraw"
                               + (" in this session." if session else "."))
            return rows[0][0]

        return self._retract(newest, who, True, session, None, idempotency_key)

    def _retract(self, pick, annotator, own_only, session_id, reason, idempotency_key) -> dict:
        who = as_str(annotator, "annotator")
        session = as_str(session_id, "session id", optional=True)
        reason = " ".join(as_str(reason, "reason").split()) if reason is not None and str(reason).strip() else None
        key = as_str(idempotency_key, "idempotency key", optional=True)

        def fn(cur):
            if key is not None:
                hit = db.rows(cur, "SELECT id, feedback_id FROM retractions WHERE idempotency_key = ?", [key])
                if hit:
                    return hit[0]
            fid = pick(cur)
            row = db.rows(cur, "SELECT annotator, id IN (SELECT feedback_id FROM retractions) FROM feedback "
                               "WHERE id = ?", [fid])
            if not row:
                raise NotFound(f"no label with id {fid}")
            given_by, withdrawn = row[0]
            if withdrawn:
                raise InvalidInput(f"Label {fid} was already withdrawn.")
            if own_only and given_by != who:
                raise InvalidInput(f"Label {fid} was given by {given_by!r}; you can only withdraw your own labels.")
            rid = cur.execute("INSERT INTO retractions (id, feedback_id, annotator, session_id, reason, "
                              "idempotency_key) VALUES (nextval('retraction_id_seq'), ?, ?, ?, ?, ?) RETURNING id",
                              [fid, who, session, reason, key]).fetchall()[0][0]
            return rid, fid

        rid, fid = self._write(fn, "the withdrawal of a label", lambda cur, res: db.scalar(
            cur, "SELECT count(*) FROM retractions WHERE id = ? AND feedback_id = ?", list(res)) == 1)
        label = db.records(self._df("SELECT * FROM feedback_history WHERE id = ?", [fid]))[0]
        restored = self._rows("SELECT id FROM feedback_current WHERE kind = ? AND criterion = ? AND annotator = ? "
                              "AND target = ?", [label["kind"], label["criterion"], label["annotator"],
                                                 label["target"]])
        return {"retraction_id": int(rid), "label": label, "restored_id": int(restored[0][0]) if restored else None}

    def retractions(self) -> pd.DataFrame:
        """Every withdrawal: id, feedback_id, annotator (who withdrew it), session_id, reason, created_at."""
        return self._df("SELECT id, feedback_id, annotator, session_id, reason, created_at FROM retractions "
                        "ORDER BY id")

    def preference_pairs(self, criterion: str | Mapping[str, float] = "overall") -> pd.DataFrame:
        """Pairs from the `preference_pairs` view for one criterion, or for several criteria {name: weight}
        combined (their pairs concatenated, margins multiplied by the weight)."""
        names, weights = criteria_weights(criterion)
        return self._df(PAIRS_SQL + " ORDER BY p.feedback_id, p.chosen_id, p.rejected_id, p.criterion",
                        [names, weights])

    def pair_conflicts(self, criterion: str | Mapping[str, float] = "overall") -> int:
        """Number of unordered pairs that appear in both directions."""
        names, weights = criteria_weights(criterion)
        return int(self._rows(f"SELECT count(*) FROM (SELECT pair_key FROM ({PAIRS_SQL}) "
                              "GROUP BY pair_key HAVING count(DISTINCT chosen_id) > 1)", [names, weights])[0][0])

    def import_preference_pairs(self, rows: Sequence[Mapping[str, str]], source: str,
                                criterion: str = "overall") -> int:
        """Import {prompt, chosen, rejected} rows (one transaction): the prompt (reused if present), two
        completions with source 'import:<source>' and a pairwise label (A = chosen, winner 'a', annotator =
        that source). Rows already imported from the same source (same texts) and rows whose chosen equals
        rejected are skipped. Returns the number of pairs added."""
        return bulk.write_pairs(self, rows, source, criterion)

    def unlabelled_pairs(self, prompt_id: int | None = None, limit: int = 2000) -> pd.DataFrame:
        """Pairs (a < b) of completions of one prompt that no current label orders yet and no current pairwise
        vote covers (a tie or "both bad" too: asking again would bring the same pair back forever), newest
        prompts first: the candidates for active learning."""
        cond = "" if prompt_id is None else " AND a.prompt_id = ?"
        params: list = [] if prompt_id is None else [as_int(prompt_id, "prompt id")]
        return self._df(
            "WITH recent AS (SELECT id FROM prompts ORDER BY id DESC LIMIT 500), "
            "covered AS (SELECT least(chosen_id, rejected_id) AS x, greatest(chosen_id, rejected_id) AS y "
            "FROM preference_pairs UNION SELECT least(completion_id, other_completion_id), "
            "greatest(completion_id, other_completion_id) FROM feedback_current WHERE kind = 'pairwise') "
            "SELECT a.prompt_id, a.id AS a, b.id AS b FROM completions a JOIN completions b "
            "ON a.prompt_id = b.prompt_id AND a.id < b.id "
            "WHERE a.prompt_id IN (SELECT id FROM recent)" + cond +
            " AND NOT EXISTS (SELECT 1 FROM covered WHERE covered.x = a.id AND covered.y = b.id) "
            f"ORDER BY a.prompt_id DESC, a.id, b.id LIMIT {int(limit)}", params)
