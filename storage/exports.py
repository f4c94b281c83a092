"""The old name of two modules, kept only so that code written before the storage split still imports (the
Dashboard tab until the UI goes through the facade): dashboard queries live in `storage.reports`, file exports
in `storage.io.export`. Nothing in the project imports this module; delete it once no branch does."""

from .io.export import (FORMATS, KINDS, RAW_TABLES, copy_query, export, export_raw,
                        preference_sql, sft_sql, unpaired_sql)
from .reports import (coverage, current_pairwise_sql, current_stars_sql, labels_over_time,
                      pairwise_coincidences, policy_votes, rated_completion_ids, star_agreement, star_distribution,
                      stars_vs_scores, time_span)

__all__ = ["FORMATS", "KINDS", "RAW_TABLES", "copy_query", "export", "export_raw", "preference_sql", "sft_sql",
           "unpaired_sql", "coverage", "current_pairwise_sql", "current_stars_sql", "labels_over_time",
           "pairwise_coincidences", "policy_votes", "rated_completion_ids", "star_agreement", "star_distribution",
           "stars_vs_scores", "time_span"]
