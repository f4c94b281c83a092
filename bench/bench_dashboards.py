"""Time every dashboard query (and the figure built from it) on a database with many labels.

    python bench/bench_dashboards.py                 # 1,000,000 labels in a temp file
    python bench/bench_dashboards.py --labels 200000 --db /tmp/b.duckdb --keep

The database is filled with plain SQL through one DuckDB connection BEFORE Store opens it (Store only
migrates the empty file first), so building 1M labels takes seconds. The data is synthetic but shaped like
real use: 20 annotators, 4 completions per prompt, some prompts blind-compared between the base model and
3 adapters, labels spread over 90 days, ~10 % of labels re-labelled (superseded), a few imported rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import duckdb
import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_studio.storage import Store  # noqa: E402

N_ANNOTATORS = 20
N_ADAPTERS = 3


def build(path: str, n_labels: int = 1_000_000, labels_per_prompt: int = 50) -> dict[str, int]:
    """Create a migrated database at `path` holding about n_labels feedback rows. Returns the row counts."""
    Store(path).close()  # creates + migrates the schema
    n_prompts = max(10, n_labels // labels_per_prompt)
    con = duckdb.connect(path)
    try:
        con.execute("SET enable_progress_bar = false")
        con.execute("BEGIN TRANSACTION")
        con.execute("INSERT INTO adapters (id, name, step, base_model_id, weights) "
                    "SELECT i, 'adapter-' || i, i * 10, 'bench/base', '\\x00'::BLOB FROM range(1, ?) t(i)",
                    [N_ADAPTERS + 1])
        # prompts: 10 % blind (A/B between policies), 10 % imported, the rest manual
        con.execute("""
            INSERT INTO prompts (id, text, source)
            SELECT i, 'Prompt number ' || i || ': explain topic ' || (hash(concat(i, ':t')) % 997),
                   CASE WHEN i % 10 = 0 THEN 'blind' WHEN i % 10 = 1 THEN 'import:bench.jsonl' ELSE 'manual' END
            FROM range(1, ? + 1) t(i)""", [n_prompts])
        # 4 completions per prompt: id = 4 * (prompt - 1) + k + 1; blind prompts: the 4 policies
        con.execute(f"""
            INSERT INTO completions (id, prompt_id, text, source, model_id, adapter_id, completion_tokens,
                                     finish_reason)
            SELECT 4 * (p - 1) + k + 1, p, 'Answer ' || k || ' to prompt ' || p,
                   CASE WHEN p % 10 = 1 THEN 'import:bench.jsonl' ELSE 'model' END, 'bench/base',
                   CASE WHEN p % 10 = 0 AND k > 0 THEN k END, 20 + (hash(concat(p, ':', k)) % 40)::INT, 'eos'
            FROM range(1, ? + 1) a(p), range(0, 4) b(k)""", [n_prompts])
        n_comp = 4 * n_prompts
        # latent quality per completion 1..5 (adapters are a little better than base on blind prompts)
        con.execute(f"""
            CREATE TEMP TABLE q AS
            SELECT id, prompt_id, least(5, 1 + (hash(concat(id, ':q')) % 5) + CASE WHEN adapter_id IS NULL THEN 0
                                                               ELSE (adapter_id % 2) END)::INT AS quality
            FROM completions""")
        # labels: kind by i % 20: 0-9 stars, 10-13 thumbs, 14-17 pairwise, 18 ranking, 19 critique
        con.execute(f"""
            INSERT INTO feedback (id, kind, criterion, prompt_id, completion_id, other_completion_id, stars, up,
                                  winner, ranking, text, annotator, source, created_at)
            WITH base AS (
                SELECT i, i % 20 AS b, 1 + hash(concat(i, ':p')) % {n_prompts} AS p, hash(concat(i, ':k')) % 4 AS k,
                       1 + hash(concat(i, ':o')) % 3 AS off, hash(concat(i, ':n')) % 100 AS noise,
                       'ann' || lpad((hash(concat(i, ':a')) % {N_ANNOTATORS})::VARCHAR, 2, '0') AS annotator,
                       TIMESTAMP '2025-01-01' + to_seconds((hash(concat(i, ':s')) % (90 * 86400))::BIGINT) AS ts
                FROM range(1, ? + 1) t(i)
            ), lab AS (
                SELECT base.*, 4 * (p - 1) + k + 1 AS c1, 4 * (p - 1) + (k + off) % 4 + 1 AS c2 FROM base
            )
            SELECT i,
                   CASE WHEN b < 10 THEN 'stars' WHEN b < 14 THEN 'thumbs' WHEN b < 18 THEN 'pairwise'
                        WHEN b = 18 THEN 'ranking' ELSE 'critique' END,
                   'overall', p,
                   CASE WHEN b = 18 THEN NULL ELSE c1 END,
                   CASE WHEN b BETWEEN 14 AND 17 THEN c2 END,
                   CASE WHEN b < 10 THEN greatest(1, least(5, q1.quality + CASE WHEN noise < 15 THEN -1
                                                                 WHEN noise > 85 THEN 1 ELSE 0 END)) END,
                   CASE WHEN b BETWEEN 10 AND 13 THEN (q1.quality >= 3) <> (noise < 10) END,
                   CASE WHEN b BETWEEN 14 AND 17 THEN
                        CASE WHEN noise < 8 THEN 'tie' WHEN noise < 12 THEN 'both_bad'
                             WHEN (q1.quality > q2.quality) <> (noise < 25) THEN 'a' ELSE 'b' END END,
                   CASE WHEN b = 18 THEN [c1, c2, 4 * (p - 1) + (k + off % 3 + 1) % 4 + 1]::BIGINT[] END,
                   CASE WHEN b = 19 THEN 'critique ' || i END,
                   CASE WHEN p % 10 = 1 THEN 'import:bench.jsonl' ELSE annotator END,
                   CASE WHEN p % 10 = 1 THEN 'import:bench.jsonl' ELSE 'human' END,
                   ts
            FROM lab JOIN q q1 ON q1.id = c1 JOIN q q2 ON q2.id = c2""", [n_labels])
        # advance the sequences past the explicit ids
        for seq, n in (("prompt_id_seq", n_prompts), ("completion_id_seq", n_comp),
                       ("feedback_id_seq", n_labels), ("adapter_id_seq", N_ADAPTERS)):
            con.execute(f"SELECT max(nextval('{seq}')) FROM range(?)", [n]).fetchall()
        con.execute("COMMIT")
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("prompts", "completions", "feedback")}
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return counts


def _time(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm-up (first query plans, loads columns)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1000, float(np.min(ts)) * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--db", default=None, help="database file (default: a temp file)")
    ap.add_argument("--keep", action="store_true", help="keep the database file")
    ap.add_argument("--reuse", action="store_true", help="use --db as it is if it exists")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    from rlhf_studio.storage import reports as q
    from rlhf_studio.studio import dashboards as d

    tmpdir = None
    path = args.db
    if path is None:
        tmpdir = tempfile.mkdtemp(prefix="bench-dash-")
        path = os.path.join(tmpdir, "bench.duckdb")
    if not (args.reuse and os.path.exists(path)):
        if os.path.exists(path):
            os.remove(path)
        t = time.perf_counter()
        counts = build(path, args.labels)
        print(f"built {path}: {counts} in {time.perf_counter() - t:.1f} s", flush=True)
    st = Store(path)
    try:
        n = st.stats()
        print(f"database: {n['feedback']:,} labels, {n['completions']:,} completions, {n['prompts']:,} prompts")
        ids = st.query("SELECT id FROM completions WHERE id IN (SELECT completion_id FROM feedback "
                       "WHERE kind = 'stars') ORDER BY id LIMIT 20000")["id"].to_numpy()
        rng = np.random.default_rng(0)
        scores = pd.DataFrame({"id": ids, "score": rng.normal(size=len(ids))})
        cases = [
            ("labels over time", lambda: q.labels_over_time(st), lambda: d.labels_over_time(st)),
            ("star distribution", lambda: q.star_distribution(st), lambda: d.star_distribution(st)),
            ("coverage", lambda: q.coverage(st), lambda: d.coverage(st)),
            ("reward vs stars (20k scores)", lambda: q.stars_vs_scores(st, scores),
             lambda: d.reward_vs_stars(st, scores)),
            ("agreement: stars (alpha+kappa)", lambda: q.star_agreement(st), None),
            ("agreement: pairwise", lambda: q.pairwise_coincidences(st), None),
            ("agreement (figure)", None, lambda: d.agreement(st)),
            ("policy leaderboard", lambda: q.policy_votes(st), lambda: d.leaderboard(st)),
        ]
        print(f"\n{'figure':32s} {'query ms':>10s} {'(min)':>8s} {'figure ms':>10s}")
        for name, query, fig in cases:
            qm = _time(query, args.repeat) if query else None
            fm = _time(fig, args.repeat) if fig else None
            print(f"{name:32s} {(f'{qm[0]:10.1f}' if qm else ' ' * 9 + '-')} "
                  f"{(f'{qm[1]:8.1f}' if qm else ' ' * 7 + '-')} {(f'{fm[0]:10.1f}' if fm else ' ' * 9 + '-')}",
                  flush=True)
        fc = _time(lambda: st.query("SELECT count(*) FROM feedback_current"), args.repeat)
        print(f"{'(ref) count(*) feedback_current':32s} {fc[0]:10.1f} {fc[1]:8.1f}")
    finally:
        st.close()
        if tmpdir and not args.keep:
            for f in os.listdir(tmpdir):
                os.remove(os.path.join(tmpdir, f))
            os.rmdir(tmpdir)


if __name__ == "__main__":
    main()
