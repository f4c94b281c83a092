"""Opening a Studio on a test's DuckDB file."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def open_studio(path: str, lm):
    """A Studio on the DuckDB file at `path`, sharing the loaded model `lm`, with background deep-tier training
    off (a test turns it on where it checks it); closed on leaving, also after a failure."""
    from rlhf_studio import Studio
    s = Studio(str(path), model=lm)
    s.reward.settings.deep_every = 0
    try:
        yield s
    finally:
        s.close()
