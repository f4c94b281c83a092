"""Store: the public storage API of RLHF Studio (DuckDB only), composed of one class per aggregate.

Every write runs on the database's single writer thread inside one transaction and returns only after COMMIT
and a read-back check. Reads run on a per-thread cursor and return pandas DataFrames (or dicts for one row).
Timestamps are naive `datetime`s holding UTC. JSON columns come back as Python objects.

Where things are: `base.StoreBase` (open/close, reads, the write path, backup, stats), `corpus.Corpus` (prompts,
completions), `labels.Labels` (criteria, feedback, retractions, preference pairs), `rewards.RewardModels`
(features, reward model versions), `runs.Runs` (runs, metrics, samples, checkpoints, adapters). A new aggregate
is a new module with a `StoreBase` subclass, added to `Store`'s bases below; it validates with
`storage.validate` and writes through `self._write` with the helpers of `storage.db`.
"""

from __future__ import annotations

from .base import TABLES, StoreBase
from .corpus import FINISH_REASONS, Corpus
from .evaluations import Evaluations
from .labels import Labels
from .rewards import TIERS, RewardModels
from .runs import CHECKPOINTS_KEPT, RUN_KINDS, RUN_STATUSES, Runs
from .watch import WatchChecks
from .validate import FEEDBACK_KINDS, WINNERS, normalise_feedback

__all__ = ["Store", "StoreBase", "TABLES", "FEEDBACK_KINDS", "WINNERS", "FINISH_REASONS", "TIERS", "RUN_KINDS",
           "RUN_STATUSES", "CHECKPOINTS_KEPT", "normalise_feedback"]


class Store(Corpus, Labels, RewardModels, WatchChecks, Runs, Evaluations, StoreBase):
    """One RLHF Studio database file. See docs/INTERNALS.md (storage.Store contract)."""
