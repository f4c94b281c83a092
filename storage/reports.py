"""Dashboard read models: aggregations in SQL that return small DataFrames (nothing here writes).

Over a million labels, the window in the `feedback_current` view costs about a second, so the dashboards take
the current label of ONE kind with a GROUP BY over the same key as the view (kind, criterion, annotator, target)
over `feedback_live` (labels not withdrawn) and `arg_max(..., id)` (the latest label wins, as in the view;
`arg_max_null` where the value may be NULL); tests/test_dashboards.py checks that they agree with
`feedback_current`.
"""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import pandas as pd

from .errors import InvalidInput, StorageError, short

# The current label of one kind: same key and same winner (highest id among labels not withdrawn) as the
# feedback_current view.
_CUR_STARS = """
    SELECT criterion, annotator, completion_id, max(id) AS id, arg_max(stars, id) AS stars,
           arg_max(source, id) AS source, arg_max(prompt_id, id) AS prompt_id
    FROM feedback_live WHERE kind = 'stars' {where} GROUP BY criterion, annotator, completion_id"""
_CUR_PAIRWISE = """
    SELECT criterion, annotator, least(completion_id, other_completion_id) AS lo,
           greatest(completion_id, other_completion_id) AS hi, max(id) AS id,
           arg_max_null(CASE winner WHEN 'a' THEN completion_id WHEN 'b' THEN other_completion_id END, id)
               AS winner_id,
           arg_max(winner, id) AS winner, arg_max(prompt_id, id) AS prompt_id
    FROM feedback_live WHERE kind = 'pairwise' {where}
    GROUP BY criterion, annotator, least(completion_id, other_completion_id),
             greatest(completion_id, other_completion_id)"""
# every current label (all kinds), reduced to its prompt: the same count as Store.prompts().n_labels
_CUR_PER_PROMPT = """
    SELECT prompt_id, count(*) AS n FROM (
        SELECT prompt_id FROM feedback_live
        GROUP BY prompt_id, kind, criterion, annotator,
                 CASE kind WHEN 'pairwise' THEN least(completion_id, other_completion_id)
                           WHEN 'ranking' THEN NULL ELSE completion_id END,
                 CASE kind WHEN 'pairwise' THEN greatest(completion_id, other_completion_id) END,
                 CASE kind WHEN 'ranking' THEN list_sort(ranking) END
    ) GROUP BY prompt_id"""


def _crit_where(criterion: str | None) -> tuple[str, list]:
    return ("", []) if criterion is None else ("AND criterion = ?", [criterion])


def current_stars_sql(criterion: str | None = None, extra: str = "") -> tuple[str, list]:
    """SQL + params of the current star labels (one criterion or all); `extra`: more `AND ...` conditions."""
    where, params = _crit_where(criterion)
    return _CUR_STARS.format(where=f"{where} {extra}"), params


def current_pairwise_sql(criterion: str | None = None) -> tuple[str, list]:
    where, params = _crit_where(criterion)
    return _CUR_PAIRWISE.format(where=where), params


def time_span(store) -> tuple[Any, Any, int]:
    """(first, last label time, number of labels) over all labels ever given (history included)."""
    r = store.query_rows("SELECT min(created_at), max(created_at), count(*) FROM feedback")[0]
    return r[0], r[1], int(r[2])


def labels_over_time(store, unit: str = "day", top_annotators: int = 10) -> pd.DataFrame:
    """Labels given per time bucket (every label event, replaced ones too: this is activity), grouped by kind
    and, separately, by annotator (the `top_annotators` busiest by name, the rest as '(other)').
    Columns t, dim ('kind' | 'annotator'), grp (the kind or annotator), n."""
    if unit not in ("hour", "day", "week", "month"):
        raise InvalidInput(f"unit must be hour, day, week or month, got {unit!r}.")
    return store.query(f"""
        WITH g AS MATERIALIZED (SELECT date_trunc('{unit}', created_at) AS t, kind, annotator, count(*) AS n
                                FROM feedback GROUP BY ALL),
        top AS (SELECT annotator FROM g GROUP BY annotator ORDER BY sum(n) DESC, annotator
                LIMIT {int(top_annotators)})
        SELECT t, 'kind' AS dim, kind AS grp, sum(n)::BIGINT AS n FROM g GROUP BY t, kind
        UNION ALL
        SELECT t, 'annotator', CASE WHEN annotator IN (SELECT annotator FROM top) THEN annotator ELSE '(other)' END,
               sum(n)::BIGINT FROM g GROUP BY ALL
        ORDER BY dim, grp, t""")


def star_distribution(store, criterion: str | None = None) -> pd.DataFrame:
    """Current star labels per criterion, origin ('human' | 'imported') and stars. Columns criterion, origin,
    stars, n."""
    sql, params = current_stars_sql(criterion)
    return store.query(f"""
        SELECT criterion, CASE WHEN source LIKE 'import:%' THEN 'imported' ELSE 'human' END AS origin,
               stars, count(*) AS n
        FROM ({sql}) GROUP BY ALL ORDER BY criterion, origin, stars""", params)


def coverage(store, fewest: int = 20, cap: int = 50, exclude_imported: bool = False) -> tuple[pd.DataFrame,
                                                                                                     pd.DataFrame]:
    """(histogram, fewest): how many prompts have n current labels (n capped at `cap`: 'cap or more'), and the
    `fewest` prompts with the fewest current labels (ties by id). Counts match Store.prompts().n_labels."""
    cond = "WHERE p.source NOT LIKE 'import:%'" if exclude_imported else ""
    df = store.query(f"""
        WITH per AS MATERIALIZED (
            SELECT p.id, p.text, p.source, coalesce(c.n, 0)::BIGINT AS n FROM prompts p
            LEFT JOIN ({_CUR_PER_PROMPT}) c ON c.prompt_id = p.id {cond}),
        hist AS (SELECT least(n, {int(cap)}) AS n, count(*) AS prompts FROM per GROUP BY 1),
        low AS (SELECT id, text, source, n FROM per ORDER BY n, id LIMIT {int(fewest)})
        SELECT 'hist' AS part, NULL::BIGINT AS id, NULL AS text, NULL AS source, n, prompts FROM hist
        UNION ALL SELECT 'low', id, text, source, n, NULL FROM low""")
    hist = df[df["part"] == "hist"][["n", "prompts"]].sort_values("n").reset_index(drop=True)
    low = df[df["part"] == "low"][["id", "text", "source", "n"]].sort_values(["n", "id"]).reset_index(drop=True)
    return hist, low


def _register(cur, df: pd.DataFrame) -> str:
    name = f"_dash_in_{threading.get_ident()}_{id(df)}"
    cur.register(name, df)
    return name


def stars_vs_scores(store, scores: pd.DataFrame, criterion: str | None = "overall",
                    max_points: int = 5000) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Reward-model score (input: DataFrame id -> score) against the mean current stars of each completion.
    Returns (points: completion_id, mean_stars, n_ratings, score; at most max_points, a deterministic
    sample), stats {n, pearson, spearman (average ranks for ties)} over ALL matched completions, and per
    rounded-star bins (stars, n, mean_score, std_score). One query."""
    frame = pd.DataFrame({"id": pd.to_numeric(scores["id"]).astype("int64"),
                          "score": pd.to_numeric(scores["score"]).astype("float64")})
    cur = store.read_cursor()
    name = _register(cur, frame)
    sql, params = current_stars_sql(criterion, f"AND completion_id IN (SELECT id FROM {name})")
    try:
        df = cur.execute(f"""
            WITH sc AS (SELECT id, avg(score) AS score FROM {name} WHERE isfinite(score) GROUP BY id),
            m AS MATERIALIZED (
                SELECT s.completion_id, avg(s.stars) AS mean_stars, count(*) AS n_ratings, any_value(sc.score) AS score
                FROM ({sql}) s JOIN sc ON sc.id = s.completion_id GROUP BY s.completion_id),
            r AS (SELECT mean_stars, score,
                         rank() OVER (ORDER BY mean_stars) + (count(*) OVER (PARTITION BY mean_stars) - 1) / 2.0 AS rs,
                         rank() OVER (ORDER BY score) + (count(*) OVER (PARTITION BY score) - 1) / 2.0 AS rc
                  FROM m),
            st AS (SELECT count(*) AS n, corr(score, mean_stars) AS pearson, corr(rc, rs) AS spearman FROM r),
            pts AS (SELECT * FROM m ORDER BY hash(completion_id), completion_id LIMIT {int(max_points)}),
            b AS (SELECT round(mean_stars)::INT AS stars, count(*) AS n, avg(score) AS mean_score,
                         stddev_samp(score) AS std_score FROM m GROUP BY 1)
            SELECT 'stats' AS part, NULL::BIGINT AS completion_id, NULL::DOUBLE AS mean_stars,
                   NULL::BIGINT AS n_ratings, NULL::DOUBLE AS score, NULL::INT AS stars, n, NULL::DOUBLE AS mean_score,
                   NULL::DOUBLE AS std_score, pearson, spearman FROM st
            UNION ALL SELECT 'point', completion_id, mean_stars, n_ratings, score, NULL, NULL, NULL, NULL, NULL, NULL
                      FROM pts
            UNION ALL SELECT 'bin', NULL, NULL, NULL, NULL, stars, n, mean_score, std_score, NULL, NULL FROM b
            """, params).df()
    except duckdb.Error as e:
        raise StorageError(f"Reading the database failed: {short(e)}") from None
    finally:
        cur.unregister(name)
    st = df[df["part"] == "stats"].iloc[0]
    nan = lambda v: None if v is None or pd.isna(v) else float(v)  # noqa: E731
    stats = {"n": int(st["n"]), "pearson": nan(st["pearson"]), "spearman": nan(st["spearman"])}
    points = df[df["part"] == "point"][["completion_id", "mean_stars", "n_ratings", "score"]]
    points = points.astype({"completion_id": "int64", "n_ratings": "int64"}).reset_index(drop=True)
    bins = df[df["part"] == "bin"][["stars", "n", "mean_score", "std_score"]].astype({"stars": "int64", "n": "int64"})
    return points, stats, bins.sort_values("stars").reset_index(drop=True)


def rated_completion_ids(store, criterion: str | None = "overall", limit: int = 1000) -> list[int]:
    """The most recently star-rated completions (for scoring them with the reward model)."""
    sql, params = current_stars_sql(criterion)
    df = store.query(f"SELECT completion_id FROM ({sql}) GROUP BY completion_id ORDER BY max(id) DESC "
                     f"LIMIT {int(limit)}", params)
    return [int(i) for i in df["completion_id"]]


def star_agreement(store, criterion: str | None = "overall") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two aggregates of the current star labels, from one query:
    coincidences (c, k, o): Krippendorff's coincidence matrix over units = (criterion, completion) rated by
        >= 2 annotators: o(c, k) = sum over units of n_uc * (n_uk - [c = k]) / (m_u - 1);
    confusions (a1, a2, s1, s2, n): for every two annotators (a1 < a2) who rated the same completions, how
        often a1 gave s1 while a2 gave s2 (Cohen's kappa per annotator pair)."""
    # One self-join of the current labels on the unit (annotators as small ints) gives, per annotator pair,
    # star pair and unit size m, the count of rating pairs: summed over m it is the confusion table, weighted
    # by 1 / (m - 1) and symmetrised it is the coincidence matrix.
    sql, params = current_stars_sql(criterion)
    df = store.query(f"""
        WITH cur0 AS MATERIALIZED ({sql}),
        ann AS (SELECT annotator, row_number() OVER (ORDER BY annotator)::INTEGER AS aid
                FROM (SELECT DISTINCT annotator FROM cur0)),
        mu AS (SELECT criterion, completion_id, count(*) AS m FROM cur0 GROUP BY ALL HAVING count(*) >= 2),
        cur AS MATERIALIZED (SELECT c.criterion, c.completion_id, ann.aid, c.stars, mu.m
                             FROM cur0 c JOIN mu USING (criterion, completion_id) JOIN ann USING (annotator)),
        g AS MATERIALIZED (
            SELECT x.aid AS a1, y.aid AS a2, x.stars AS s1, y.stars AS s2, x.m, count(*) AS n
            FROM cur x JOIN cur y ON x.criterion = y.criterion AND x.completion_id = y.completion_id AND x.aid < y.aid
            GROUP BY ALL),
        co AS (SELECT c, k, sum(w)::DOUBLE AS o FROM (
                   SELECT s1 AS c, s2 AS k, n / (m - 1) AS w FROM g UNION ALL SELECT s2, s1, n / (m - 1) FROM g)
               GROUP BY ALL),
        cf AS (SELECT a.annotator AS a1, b.annotator AS a2, s1, s2, sum(n)::BIGINT AS n
               FROM g JOIN ann a ON a.aid = g.a1 JOIN ann b ON b.aid = g.a2 GROUP BY ALL)
        SELECT 'co' AS part, c, k, o, NULL AS a1, NULL AS a2, NULL::BIGINT AS n FROM co
        UNION ALL SELECT 'cf', s1, s2, NULL, a1, a2, n FROM cf""", params)
    co = df[df["part"] == "co"][["c", "k", "o"]].astype({"c": "int64", "k": "int64"})
    cf = df[df["part"] == "cf"].rename(columns={"c": "s1", "k": "s2"})[["a1", "a2", "s1", "s2", "n"]]
    cf = cf.astype({"s1": "int64", "s2": "int64", "n": "int64"})
    return (co.sort_values(["c", "k"]).reset_index(drop=True),
            cf.sort_values(["a1", "a2", "s1", "s2"]).reset_index(drop=True))


def pairwise_coincidences(store, criterion: str | None = "overall") -> pd.DataFrame:
    """Coincidence matrix of current pairwise choices on the same unordered pair by >= 2 annotators; values:
    'lo' (the lower completion id won), 'hi', 'tie', 'both_bad'. Columns c, k, o."""
    sql, params = current_pairwise_sql(criterion)
    return store.query(f"""
        WITH cur AS (SELECT criterion, lo, hi, CASE WHEN winner_id = lo THEN 'lo' WHEN winner_id = hi THEN 'hi'
                                                    ELSE winner END AS v FROM ({sql})),
        u AS (SELECT criterion, lo, hi, v, count(*) AS n FROM cur GROUP BY ALL),
        m AS (SELECT criterion, lo, hi, sum(n) AS m FROM u GROUP BY ALL HAVING sum(n) >= 2)
        SELECT a.v AS c, b.v AS k, sum(a.n * (b.n - CASE WHEN a.v = b.v THEN 1 ELSE 0 END) / (m.m - 1))::DOUBLE AS o
        FROM u a JOIN u b ON a.criterion = b.criterion AND a.lo = b.lo AND a.hi = b.hi
        JOIN m ON m.criterion = a.criterion AND m.lo = a.lo AND m.hi = a.hi
        GROUP BY ALL ORDER BY c, k""", params)


def policy_votes(store, criterion: str | None = "overall", blind_only: bool = False) -> pd.DataFrame:
    """Current pairwise votes between model completions of two DIFFERENT policies (completions.adapter_id;
    NULL = the base model), aggregated per policy pair (p1 < p2; 0 = base). Columns p1, p2, name1, name2,
    wins1, wins2, ties (tie), both_bad. blind_only: only prompts from the Blind compare tab."""
    sql, params = current_pairwise_sql(criterion)
    blind = "AND pr.source = 'blind'" if blind_only else ""
    return store.query(f"""
        WITH v AS (
            SELECT coalesce(a.adapter_id, 0) AS pa, coalesce(b.adapter_id, 0) AS pb, cur.winner_id, cur.winner,
                   cur.lo, cur.hi
            FROM ({sql}) cur
            JOIN completions a ON a.id = cur.lo JOIN completions b ON b.id = cur.hi
            JOIN prompts pr ON pr.id = cur.prompt_id
            WHERE a.source = 'model' AND b.source = 'model' AND a.adapter_id IS DISTINCT FROM b.adapter_id {blind}),
        o AS (SELECT least(pa, pb) AS p1, greatest(pa, pb) AS p2,
                     CASE WHEN winner_id IS NULL THEN NULL
                          WHEN (winner_id = lo AND pa < pb) OR (winner_id = hi AND pb < pa) THEN 1 ELSE 2 END AS w,
                     winner FROM v),
        g AS (SELECT p1, p2, count(*) FILTER (WHERE w = 1) AS wins1, count(*) FILTER (WHERE w = 2) AS wins2,
                     count(*) FILTER (WHERE winner = 'tie') AS ties,
                     count(*) FILTER (WHERE winner = 'both_bad') AS both_bad
              FROM o GROUP BY p1, p2)
        SELECT g.p1, g.p2,
               CASE WHEN g.p1 = 0 THEN 'base' ELSE coalesce(a1.name, 'adapter') || ' #' || g.p1 END AS name1,
               CASE WHEN g.p2 = 0 THEN 'base' ELSE coalesce(a2.name, 'adapter') || ' #' || g.p2 END AS name2,
               g.wins1, g.wins2, g.ties, g.both_bad
        FROM g LEFT JOIN adapters a1 ON a1.id = g.p1 LEFT JOIN adapters a2 ON a2.id = g.p2
        ORDER BY g.p1, g.p2""", params)
