"""Numbered schema migrations. Append new (version, sql) entries; never edit an applied one.

Each migration runs in its own transaction together with its `schema_version` row.

DuckDB foreign-key limitations that shaped this schema (DuckDB 2):
- no ON DELETE/UPDATE CASCADE, and a referenced row can never be deleted -> nothing referenced is ever deleted
  (only `checkpoints`, `run_metrics`, `features` rows, which nothing references, are replaced/pruned);
- self-referencing foreign keys are checked per statement batch and make `COPY FROM DATABASE` (backup) fail
  when a row references a row of the same batch -> `completions.corrects_id` and `reward_versions.parent_id`
  are validated in Python instead of by an FK.
Timestamps are TIMESTAMP columns holding UTC, always set by DuckDB as `now() AT TIME ZONE 'UTC'`.
"""

from __future__ import annotations

NOW = "(now() AT TIME ZONE 'UTC')"

_V1 = f"""
CREATE SEQUENCE prompt_id_seq;
CREATE SEQUENCE completion_id_seq;
CREATE SEQUENCE feedback_id_seq;
CREATE SEQUENCE reward_version_id_seq;
CREATE SEQUENCE run_id_seq;
CREATE SEQUENCE adapter_id_seq;

CREATE TABLE runs (
    id          BIGINT PRIMARY KEY DEFAULT nextval('run_id_seq'),
    kind        VARCHAR NOT NULL CHECK (kind IN ('ppo', 'reward')),
    status      VARCHAR NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'completed', 'cancelled', 'failed', 'interrupted')),
    config      JSON NOT NULL DEFAULT '{{}}',
    lineage     JSON NOT NULL DEFAULT '{{}}',
    error       VARCHAR,
    created_at  TIMESTAMP NOT NULL DEFAULT {NOW},
    updated_at  TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE TABLE adapters (
    id             BIGINT PRIMARY KEY DEFAULT nextval('adapter_id_seq'),
    run_id         BIGINT REFERENCES runs (id),
    name           VARCHAR NOT NULL CHECK (length(trim(name)) > 0),
    step           BIGINT CHECK (step >= 0),
    base_model_id  VARCHAR NOT NULL,
    base_revision  VARCHAR,
    config         JSON NOT NULL DEFAULT '{{}}',
    weights        BLOB NOT NULL,
    created_at     TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE TABLE prompts (
    id          BIGINT PRIMARY KEY DEFAULT nextval('prompt_id_seq'),
    text        VARCHAR NOT NULL UNIQUE CHECK (length(trim(text)) > 0),
    source      VARCHAR NOT NULL DEFAULT 'manual',
    created_at  TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE TABLE completions (
    id                 BIGINT PRIMARY KEY DEFAULT nextval('completion_id_seq'),
    prompt_id          BIGINT NOT NULL REFERENCES prompts (id),
    text               VARCHAR NOT NULL,
    source             VARCHAR NOT NULL DEFAULT 'model'
                       CHECK (source IN ('model', 'human') OR source LIKE 'import:_%'),
    model_id           VARCHAR,
    model_revision     VARCHAR,
    adapter_id         BIGINT REFERENCES adapters (id),
    params             JSON,
    seed               BIGINT,
    prompt_tokens      INTEGER CHECK (prompt_tokens >= 0),
    completion_tokens  INTEGER CHECK (completion_tokens >= 0),
    finish_reason      VARCHAR CHECK (finish_reason IN ('eos', 'length', 'stop', 'human')),
    latency_s          DOUBLE CHECK (latency_s >= 0),
    corrects_id        BIGINT,            -- the completion a human rewrite corrects (checked in Python)
    created_at         TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE TABLE criteria (
    name         VARCHAR PRIMARY KEY CHECK (regexp_full_match(name, '[\\pL\\pN _-]{{1,64}}')),
    description  VARCHAR NOT NULL DEFAULT '',
    created_at   TIMESTAMP NOT NULL DEFAULT {NOW}
);
INSERT INTO criteria (name, description) VALUES ('overall', 'Overall quality of the response');

CREATE TABLE feedback (
    id                     BIGINT PRIMARY KEY DEFAULT nextval('feedback_id_seq'),
    kind                   VARCHAR NOT NULL
                           CHECK (kind IN ('stars', 'thumbs', 'pairwise', 'ranking', 'critique', 'rewrite')),
    criterion              VARCHAR NOT NULL DEFAULT 'overall' REFERENCES criteria (name),
    prompt_id              BIGINT NOT NULL REFERENCES prompts (id),
    completion_id          BIGINT REFERENCES completions (id),   -- target; pairwise: side A; ranking: NULL
    other_completion_id    BIGINT REFERENCES completions (id),   -- pairwise: side B
    stars                  INTEGER CHECK (stars BETWEEN 1 AND 5),
    up                     BOOLEAN,
    winner                 VARCHAR CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
    ranking                BIGINT[],                              -- completion ids, best first
    text                   VARCHAR,                               -- critique text
    tags                   VARCHAR[],                             -- thumbs reason tags
    rewrite_completion_id  BIGINT REFERENCES completions (id),
    annotator              VARCHAR NOT NULL DEFAULT 'local',
    session_id             VARCHAR,
    idempotency_key        VARCHAR UNIQUE,
    source                 VARCHAR NOT NULL DEFAULT 'human',      -- 'human' or the import source
    created_at             TIMESTAMP NOT NULL DEFAULT {NOW},
    CHECK (kind <> 'stars'    OR (stars IS NOT NULL AND completion_id IS NOT NULL)),
    CHECK (kind <> 'thumbs'   OR (up IS NOT NULL AND completion_id IS NOT NULL)),
    CHECK (kind <> 'pairwise' OR (winner IS NOT NULL AND completion_id IS NOT NULL
                                  AND other_completion_id IS NOT NULL AND completion_id <> other_completion_id)),
    CHECK (kind <> 'ranking'  OR (ranking IS NOT NULL AND len(ranking) >= 2
                                  AND len(list_distinct(ranking)) = len(ranking))),
    CHECK (kind <> 'critique' OR (completion_id IS NOT NULL AND length(trim(text)) > 0)),
    CHECK (kind <> 'rewrite'  OR (completion_id IS NOT NULL AND rewrite_completion_id IS NOT NULL))
);

CREATE TABLE features (
    model_revision  VARCHAR NOT NULL,
    completion_id   BIGINT NOT NULL REFERENCES completions (id),
    vec             FLOAT[] NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT {NOW},
    PRIMARY KEY (model_revision, completion_id)
);

CREATE TABLE reward_versions (
    id           BIGINT PRIMARY KEY DEFAULT nextval('reward_version_id_seq'),
    tier         VARCHAR NOT NULL CHECK (tier IN ('fast', 'deep')),
    parent_id    BIGINT,                  -- previous version (checked in Python)
    criterion    VARCHAR NOT NULL,        -- a criterion name, or a JSON object {{name: weight}}
    config       JSON NOT NULL,
    pair_ids     JSON NOT NULL,           -- the pairs it saw (e.g. pair_keys or feedback ids)
    labels_seen  INTEGER NOT NULL CHECK (labels_seen >= 0),
    metrics      JSON NOT NULL,
    weights      BLOB NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE TABLE run_metrics (
    run_id  BIGINT NOT NULL REFERENCES runs (id),
    step    BIGINT NOT NULL CHECK (step >= 0),
    name    VARCHAR NOT NULL,
    value   DOUBLE,
    PRIMARY KEY (run_id, step, name)
);

CREATE TABLE run_samples (
    run_id    BIGINT NOT NULL REFERENCES runs (id),
    step      BIGINT NOT NULL CHECK (step >= 0),
    idx       INTEGER NOT NULL,
    prompt    VARCHAR NOT NULL,
    response  VARCHAR NOT NULL,
    reward    DOUBLE,
    PRIMARY KEY (run_id, step, idx)
);

CREATE TABLE checkpoints (
    run_id      BIGINT NOT NULL REFERENCES runs (id),
    step        BIGINT NOT NULL CHECK (step >= 0),
    state       BLOB NOT NULL,
    created_at  TIMESTAMP NOT NULL DEFAULT {NOW},
    PRIMARY KEY (run_id, step)
);

-- Every label with its target and whether a later label replaced it. The target of a label is the
-- completion (stars, thumbs, critique, rewrite), the unordered pair (pairwise) or the prompt (ranking);
-- the current label per (kind, criterion, annotator, target) is the one with the highest id.
CREATE VIEW feedback_history AS
SELECT t.*,
       row_number() OVER (PARTITION BY t.kind, t.criterion, t.annotator, t.target ORDER BY t.id DESC) > 1
           AS superseded
FROM (
    SELECT f.*,
           CASE f.kind
               WHEN 'pairwise' THEN 'pair:' || least(f.completion_id, f.other_completion_id)::VARCHAR
                                    || '-' || greatest(f.completion_id, f.other_completion_id)::VARCHAR
               WHEN 'ranking' THEN 'prompt:' || f.prompt_id::VARCHAR
               ELSE 'completion:' || f.completion_id::VARCHAR
           END AS target
    FROM feedback f
) t;

CREATE VIEW feedback_current AS
SELECT * EXCLUDE (superseded) FROM feedback_history WHERE NOT superseded;

-- The one pair compiler (reward model and exports both read it). Only current labels count.
--   pairwise a/b -> 1 pair (margin 1); tie / both_bad -> none
--   ranking of N -> N(N-1)/2 ordered pairs (margin 1)
--   stars -> every two completions of a prompt rated by the same annotator on the same criterion with
--            different stars (margin = star difference; feedback_id = the later of the two labels)
--   thumbs -> every up x down within a prompt, criterion and annotator (margin 1; feedback_id = the later)
--   rewrite -> the human rewrite beats the completion it corrects (margin 1); critique -> none
-- pair_key = 'low-high' completion ids; heldout = deterministic ~20 % split by md5(pair_key).
CREATE VIEW preference_pairs AS
WITH cur AS (SELECT * FROM feedback_current),
raw AS (
    SELECT prompt_id,
           CASE WHEN winner = 'a' THEN completion_id ELSE other_completion_id END AS chosen_id,
           CASE WHEN winner = 'a' THEN other_completion_id ELSE completion_id END AS rejected_id,
           1.0::DOUBLE AS margin, kind, id AS feedback_id, criterion, annotator, source
    FROM cur WHERE kind = 'pairwise' AND winner IN ('a', 'b')
    UNION ALL
    SELECT f.prompt_id, f.ranking[i.i], f.ranking[j.j], 1.0::DOUBLE, f.kind, f.id, f.criterion,
           f.annotator, f.source
    FROM cur f, range(1, len(f.ranking) + 1) i(i), range(1, len(f.ranking) + 1) j(j)
    WHERE f.kind = 'ranking' AND i.i < j.j
    UNION ALL
    SELECT hi.prompt_id, hi.completion_id, lo.completion_id, (hi.stars - lo.stars)::DOUBLE, 'stars',
           greatest(hi.id, lo.id), hi.criterion, hi.annotator, hi.source
    FROM cur hi JOIN cur lo
      ON hi.kind = 'stars' AND lo.kind = 'stars' AND hi.prompt_id = lo.prompt_id
     AND hi.criterion = lo.criterion AND hi.annotator = lo.annotator AND hi.stars > lo.stars
    UNION ALL
    SELECT u.prompt_id, u.completion_id, d.completion_id, 1.0::DOUBLE, 'thumbs',
           greatest(u.id, d.id), u.criterion, u.annotator, u.source
    FROM cur u JOIN cur d
      ON u.kind = 'thumbs' AND d.kind = 'thumbs' AND u.prompt_id = d.prompt_id
     AND u.criterion = d.criterion AND u.annotator = d.annotator AND u.up AND NOT d.up
    UNION ALL
    SELECT prompt_id, rewrite_completion_id, completion_id, 1.0::DOUBLE, kind, id, criterion, annotator, source
    FROM cur WHERE kind = 'rewrite'
),
keyed AS (
    SELECT *, least(chosen_id, rejected_id)::VARCHAR || '-' || greatest(chosen_id, rejected_id)::VARCHAR
              AS pair_key
    FROM raw
)
SELECT prompt_id, chosen_id, rejected_id, margin, kind, feedback_id, criterion, annotator, source, pair_key,
       (('0x' || substr(md5(pair_key), 1, 8))::UBIGINT % 5 = 0) AS heldout
FROM keyed;
"""

# 2: automatic fast-tier refits after each label keep their metrics but not always their weights.
_V2 = """
ALTER TABLE reward_versions ALTER COLUMN weights DROP NOT NULL;
"""

# 3: what a run did differently from its config and went on (e.g. trained eagerly where compiling failed).
_V3 = """
ALTER TABLE runs ADD COLUMN notes VARCHAR;
"""

# 4: a label can be withdrawn (undo, or a mislabel found later). Labels stay immutable: a withdrawal is a row of
# its own, and the views below skip withdrawn labels, so the label the withdrawn one had replaced (if any) is
# current again. `feedback_live` is every label not withdrawn; the dashboards' one-kind queries read it too.
# And the target of a ranking is the set of completions it orders, no longer its prompt: ranking the 4 new
# completions of a prompt generated again silently replaced the ranking of its first 4.
_V4 = f"""
CREATE SEQUENCE retraction_id_seq;
CREATE TABLE retractions (
    id               BIGINT PRIMARY KEY DEFAULT nextval('retraction_id_seq'),
    feedback_id      BIGINT NOT NULL UNIQUE REFERENCES feedback (id),
    annotator        VARCHAR NOT NULL,          -- who withdrew it
    session_id       VARCHAR,
    reason           VARCHAR,
    idempotency_key  VARCHAR UNIQUE,
    created_at       TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE VIEW feedback_live AS
SELECT * FROM feedback WHERE id NOT IN (SELECT feedback_id FROM retractions);

CREATE OR REPLACE VIEW feedback_history AS
SELECT t.*,
       NOT t.retracted AND row_number() OVER (PARTITION BY t.kind, t.criterion, t.annotator, t.target, t.retracted
                                              ORDER BY t.id DESC) > 1 AS superseded
FROM (
    SELECT f.*,
           CASE f.kind
               WHEN 'pairwise' THEN 'pair:' || least(f.completion_id, f.other_completion_id)::VARCHAR
                                    || '-' || greatest(f.completion_id, f.other_completion_id)::VARCHAR
               WHEN 'ranking' THEN 'ranking:' || list_sort(f.ranking)::VARCHAR
               ELSE 'completion:' || f.completion_id::VARCHAR
           END AS target,
           r.feedback_id IS NOT NULL AS retracted
    FROM feedback f LEFT JOIN retractions r ON r.feedback_id = f.id
) t;

CREATE OR REPLACE VIEW feedback_current AS
SELECT * EXCLUDE (superseded, retracted) FROM feedback_history WHERE NOT superseded AND NOT retracted;
"""

# 5: held-out evaluation. `heldout_prompts` are prompts a user set aside from training by hand (the studio also
# holds out ~20 % by a hash of the prompt text, computed in studio/evaluation.py, so that needs no row).
# `evaluations` keep each evaluation's lineage; `evaluation_pairs` its completions side by side, which side was
# shown (or passed) first, the verdict of a non-human judge and the reward model's scores. Human verdicts are
# the pairwise labels on those two completions (table feedback), so they fill in as votes arrive.
_V5 = f"""
CREATE TABLE heldout_prompts (
    prompt_id   BIGINT PRIMARY KEY REFERENCES prompts (id),
    reason      VARCHAR NOT NULL DEFAULT 'marked',
    created_at  TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE SEQUENCE evaluation_id_seq;
CREATE TABLE evaluations (
    id                   BIGINT PRIMARY KEY DEFAULT nextval('evaluation_id_seq'),
    policy               VARCHAR NOT NULL,           -- 'base' or 'adapter-<id>'
    baseline             VARCHAR NOT NULL,
    policy_adapter_id    BIGINT REFERENCES adapters (id),
    baseline_adapter_id  BIGINT REFERENCES adapters (id),
    judge                VARCHAR NOT NULL,           -- 'reward', 'human' or 'callable:<name>'
    criterion            VARCHAR NOT NULL REFERENCES criteria (name),
    reward_version       BIGINT REFERENCES reward_versions (id),
    seed                 BIGINT NOT NULL,
    model_id             VARCHAR,
    model_revision       VARCHAR,
    config               JSON NOT NULL DEFAULT '{{}}',  -- sampling settings, prompt selection
    created_at           TIMESTAMP NOT NULL DEFAULT {NOW}
);

CREATE TABLE evaluation_pairs (
    evaluation_id           BIGINT NOT NULL REFERENCES evaluations (id),
    idx                     INTEGER NOT NULL CHECK (idx >= 0),
    prompt_id               BIGINT NOT NULL REFERENCES prompts (id),
    seed                    BIGINT,
    policy_completion_id    BIGINT NOT NULL REFERENCES completions (id),
    baseline_completion_id  BIGINT NOT NULL REFERENCES completions (id),
    policy_first            BOOLEAN NOT NULL,       -- shown on the left / passed to the judge first
    judge_winner            VARCHAR CHECK (judge_winner IN ('policy', 'baseline', 'tie')),   -- NULL: human
    policy_reward           DOUBLE,
    baseline_reward         DOUBLE,
    PRIMARY KEY (evaluation_id, idx)
);
"""

# 6: the reward-hacking watch (components/training/watch.py). One row per check of a PPO run: its signals, verdict and
# examples; `adapter` holds the policy at the best check so far (for a roll back), pruned on the others;
# `paused_at` is set when that check paused the run. A run's status cannot take a new value (DuckDB cannot change
# the CHECK on `runs.status`): a paused run is stored 'cancelled' and reads as 'paused' while its pause is its
# newest status change (paused_at = runs.updated_at, written in one transaction). `watch_judges` keeps each
# run's second judge (a fast-tier model on held-out labels), so a resumed run is judged by the same one.
_V6 = f"""
CREATE SEQUENCE watch_check_id_seq;
CREATE TABLE watch_checks (
    id          BIGINT PRIMARY KEY DEFAULT nextval('watch_check_id_seq'),
    run_id      BIGINT NOT NULL REFERENCES runs (id),
    step        INTEGER NOT NULL,
    verdict     VARCHAR NOT NULL CHECK (verdict IN ('ok', 'pause')),
    reason      VARCHAR,
    signals     JSON NOT NULL,
    examples    JSON,
    best        BOOLEAN NOT NULL DEFAULT false,
    adapter     BLOB,
    paused_at   TIMESTAMP,
    created_at  TIMESTAMP NOT NULL DEFAULT {NOW}
);
CREATE TABLE watch_judges (
    run_id      BIGINT PRIMARY KEY REFERENCES runs (id),
    weights     BLOB NOT NULL,
    pairs       INTEGER NOT NULL,
    created_at  TIMESTAMP NOT NULL DEFAULT {NOW}
);
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
    (5, _V5),
    (6, _V6),
]

LATEST_VERSION = MIGRATIONS[-1][0]

BOOTSTRAP = f"""
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    applied_at  TIMESTAMP NOT NULL DEFAULT {NOW}
);
"""


def current_version(cur) -> int:
    """The highest applied version, 0 for a database without our schema_version table."""
    exists = cur.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'schema_version' "
        "AND database_name = current_database()"
    ).fetchone()[0]
    if not exists:
        return 0
    return int(cur.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])


def migrate(cur) -> list[int]:
    """Apply the pending migrations in order, each in its own transaction. Returns the versions applied."""
    cur.execute(BOOTSTRAP)
    have = current_version(cur)
    applied = []
    for version, sql in MIGRATIONS:
        if version <= have:
            continue
        cur.execute("BEGIN TRANSACTION")
        try:
            cur.execute(sql)
            cur.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
            cur.execute("COMMIT")
        except BaseException:
            try:
                cur.execute("ROLLBACK")
            except Exception:
                pass
            raise
        if current_version(cur) != version:
            raise RuntimeError(f"schema migration {version} was not saved")
        applied.append(version)
    return applied
