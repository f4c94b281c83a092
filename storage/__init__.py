"""RLHF Studio storage: one DuckDB file, numbered migrations, one writer thread, DataFrames out.

Imports nothing else of the project (DuckDB, pandas and numpy only).
"""

from .db import records
from .errors import InvalidInput, NotFound, StorageError
from .migrations import LATEST_VERSION
from .store import FEEDBACK_KINDS, Store

__all__ = ["Store", "StorageError", "NotFound", "InvalidInput", "FEEDBACK_KINDS", "LATEST_VERSION",
           "records"]
