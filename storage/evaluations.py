"""Held-out prompts marked by hand, and evaluations of a policy against a baseline (migration 5). Human verdicts
are the current pairwise labels on an evaluation pair's two completions under its criterion."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from . import db
from .base import StoreBase
from .errors import InvalidInput, NotFound
from .validate import as_float, as_ids, as_int, as_str, criterion_name


class Evaluations(StoreBase):
    """Held-out prompt marks, evaluations and their pairs, and the human votes on them."""

    def mark_prompts_heldout(self, prompt_ids: Sequence[int], reason: str = "marked") -> int:
        """Set prompts aside from training (kept for evaluation). Returns how many were not marked before."""
        ids = sorted(set(as_ids(prompt_ids, "prompt id")))
        reason = as_str(reason, "reason").strip()
        if not ids:
            return 0

        def fn(cur):
            if db.count_ids(cur, "prompts", ids) != len(ids):
                raise NotFound("no prompt with some of the ids " + ", ".join(map(str, ids)))
            before = db.scalar(cur, "SELECT count(*) FROM heldout_prompts")
            cur.execute("INSERT INTO heldout_prompts (prompt_id, reason) SELECT unnest(?::BIGINT[]), ? "
                        "ON CONFLICT (prompt_id) DO NOTHING", [ids, reason]).fetchall()
            return db.scalar(cur, "SELECT count(*) FROM heldout_prompts") - before

        return int(self._write(fn, "the held-out prompts", lambda cur, _: db.count_ids(
            cur, "heldout_prompts", ids, col="prompt_id") == len(ids)))

    def heldout_marks(self) -> pd.DataFrame:
        """prompt_id, text, reason, created_at of the prompts marked held-out by hand."""
        return self._df("SELECT h.prompt_id, p.text, h.reason, h.created_at FROM heldout_prompts h "
                        "JOIN prompts p ON p.id = h.prompt_id ORDER BY h.prompt_id")

    def add_evaluation(self, meta: Mapping[str, Any], pairs: Sequence[Mapping[str, Any]]) -> int:
        """One evaluation and all its pairs in one transaction. meta: policy, baseline, policy_adapter_id,
        baseline_adapter_id, judge, criterion, reward_version, seed, model_id, model_revision, config. pairs:
        prompt_id, seed, policy_completion_id, baseline_completion_id, policy_first, judge_winner, policy_reward,
        baseline_reward."""
        if not pairs:
            raise InvalidInput("an evaluation needs at least one pair of completions.")
        head = [as_str(meta.get("policy"), "policy"), as_str(meta.get("baseline"), "baseline"),
                as_int(meta.get("policy_adapter_id"), "policy_adapter_id", optional=True),
                as_int(meta.get("baseline_adapter_id"), "baseline_adapter_id", optional=True),
                as_str(meta.get("judge"), "judge"), criterion_name(meta.get("criterion", "overall")),
                as_int(meta.get("reward_version"), "reward_version", optional=True), as_int(meta.get("seed", 0), "seed"),
                as_str(meta.get("model_id"), "model_id", optional=True),
                as_str(meta.get("model_revision"), "model_revision", optional=True),
                db.to_json(dict(meta.get("config") or {}))]
        rows = []
        for i, p in enumerate(pairs):
            winner = p.get("judge_winner")
            if winner not in (None, "policy", "baseline", "tie"):
                raise InvalidInput(f"pair {i}: judge_winner must be policy, baseline, tie or None, got {winner!r}.")
            rows.append([i, as_int(p.get("prompt_id"), "prompt_id"), as_int(p.get("seed"), "seed", optional=True),
                         as_int(p.get("policy_completion_id"), "policy_completion_id"),
                         as_int(p.get("baseline_completion_id"), "baseline_completion_id"),
                         bool(p.get("policy_first")), winner,
                         as_float(p.get("policy_reward"), "policy_reward", optional=True),
                         as_float(p.get("baseline_reward"), "baseline_reward", optional=True)])

        def fn(cur):
            if not db.rows(cur, "SELECT 1 FROM criteria WHERE name = ?", [head[5]]):
                raise NotFound(f"no criterion named {head[5]!r}; add it first")
            eid = cur.execute(
                "INSERT INTO evaluations (id, policy, baseline, policy_adapter_id, baseline_adapter_id, judge, "
                "criterion, reward_version, seed, model_id, model_revision, config) VALUES "
                "(nextval('evaluation_id_seq'), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id", head).fetchall()[0][0]
            cur.executemany("INSERT INTO evaluation_pairs (evaluation_id, idx, prompt_id, seed, policy_completion_id, "
                            "baseline_completion_id, policy_first, judge_winner, policy_reward, baseline_reward) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [[eid] + r for r in rows])
            return eid

        return self._write(fn, "the evaluation", lambda cur, eid: db.scalar(
            cur, "SELECT count(*) FROM evaluation_pairs WHERE evaluation_id = ?", [eid]) == len(rows))

    def evaluations(self) -> pd.DataFrame:
        """Every evaluation's lineage, oldest first (config parsed from JSON)."""
        return db.parse_json_cols(self._df("SELECT * FROM evaluations ORDER BY id"), ["config"])

    def evaluation(self, evaluation_id: int) -> dict:
        eid = as_int(evaluation_id, "evaluation id")
        df = self._df("SELECT * FROM evaluations WHERE id = ?", [eid])
        if df.empty:
            raise NotFound(f"no evaluation with id {eid}")
        return db.records(db.parse_json_cols(df, ["config"]))[0]

    def evaluation_pairs(self, evaluation_id: int | None = None) -> pd.DataFrame:
        """The pairs (of one evaluation, or all) with the prompt, both texts and their lengths in tokens."""
        cond, params = ("", []) if evaluation_id is None else \
            (" WHERE e.evaluation_id = ?", [as_int(evaluation_id, "evaluation id")])
        return self._df(
            "SELECT e.*, p.text AS prompt, a.text AS policy_text, b.text AS baseline_text, "
            "a.completion_tokens AS policy_tokens, b.completion_tokens AS baseline_tokens "
            "FROM evaluation_pairs e JOIN prompts p ON p.id = e.prompt_id "
            "JOIN completions a ON a.id = e.policy_completion_id JOIN completions b ON b.id = e.baseline_completion_id"
            + cond + " ORDER BY e.evaluation_id, e.idx", params)

    _EVAL_VOTES = """
        SELECT e.evaluation_id, e.idx, f.id AS feedback_id, f.annotator, f.winner,
               CASE WHEN f.winner IN ('tie', 'both_bad') THEN 'tie'
                    WHEN (f.winner = 'a') = (f.completion_id = e.policy_completion_id) THEN 'policy'
                    ELSE 'baseline' END AS outcome
        FROM evaluation_pairs e JOIN evaluations v ON v.id = e.evaluation_id
        JOIN feedback_current f ON f.kind = 'pairwise' AND f.source = 'human' AND f.criterion = v.criterion
         AND least(f.completion_id, f.other_completion_id) = least(e.policy_completion_id, e.baseline_completion_id)
         AND greatest(f.completion_id, f.other_completion_id) = greatest(e.policy_completion_id,
                                                                         e.baseline_completion_id)"""

    def evaluation_votes(self, evaluation_id: int | None = None) -> pd.DataFrame:
        """Current human pairwise votes on evaluation pairs: evaluation_id, idx, feedback_id, annotator, winner
        (as stored) and outcome (policy | baseline | tie; both bad counts as a tie)."""
        cond, params = ("", []) if evaluation_id is None else \
            (" WHERE e.evaluation_id = ?", [as_int(evaluation_id, "evaluation id")])
        return self._df(self._EVAL_VOTES + cond + " ORDER BY e.evaluation_id, e.idx, f.id", params)

    def next_evaluation_pair(self, annotator: str) -> dict | None:
        """The oldest pair of a human-judged evaluation that `annotator` has not voted on yet (None when none):
        evaluation_id, idx, criterion, prompt, and the completions in the order to show them (left, right)."""
        annotator = as_str(annotator, "annotator")
        rows = self._rows(
            "SELECT e.evaluation_id, e.idx, v.criterion, p.text, "
            "CASE WHEN e.policy_first THEN e.policy_completion_id ELSE e.baseline_completion_id END AS left_id, "
            "CASE WHEN e.policy_first THEN e.baseline_completion_id ELSE e.policy_completion_id END AS right_id "
            "FROM evaluation_pairs e JOIN evaluations v ON v.id = e.evaluation_id JOIN prompts p ON p.id = e.prompt_id "
            "WHERE v.judge = 'human' AND NOT EXISTS (SELECT 1 FROM (" + self._EVAL_VOTES + ") x "
            "WHERE x.evaluation_id = e.evaluation_id AND x.idx = e.idx AND x.annotator = ?) "
            "ORDER BY e.evaluation_id, e.idx LIMIT 1", [annotator])
        if not rows:
            return None
        eid, idx, crit, prompt, left, right = rows[0]
        texts = dict(self._rows("SELECT id, text FROM completions WHERE id IN (?, ?)", [left, right]))
        return dict(evaluation_id=int(eid), idx=int(idx), criterion=crit, prompt=prompt, left_id=int(left),
                    right_id=int(right), left_text=texts[left], right_text=texts[right])
