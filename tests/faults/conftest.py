"""Fixtures of the fault suite and its summary line ("fault suite: N cases tried, N passed")."""
from __future__ import annotations

import os

import pytest

from .helpers import QUIET_THREADS, Child

_OUTCOMES: dict[str, str] = {}


def _is_fault_case(nodeid: str) -> bool:
    return nodeid.replace("\\", "/").startswith("tests/faults/")


def pytest_runtest_logreport(report):
    if not _is_fault_case(report.nodeid):
        return
    prev = _OUTCOMES.get(report.nodeid)
    if hasattr(report, "wasxfail"):
        outcome = "xpassed" if report.passed else "xfailed"
    elif report.failed:
        outcome = "failed"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    if prev in ("failed",):   # a failing teardown after a passing call counts as failed
        return
    _OUTCOMES[report.nodeid] = outcome


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES:
        return
    counts: dict[str, int] = {}
    for o in _OUTCOMES.values():
        counts[o] = counts.get(o, 0) + 1
    tried = len(_OUTCOMES) - counts.get("skipped", 0)
    extra = ", ".join(f"{counts[k]} {k}" for k in ("failed", "xfailed", "xpassed", "skipped") if counts.get(k))
    line = f"fault suite: {tried} cases tried, {counts.get('passed', 0)} passed" + (f" ({extra})" if extra else "")
    terminalreporter.write_sep("=", line)


@pytest.fixture
def child_factory():
    made: list[Child] = []

    def make(script: str, *args: str, **kw) -> Child:
        c = Child(script, *args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(autouse=True, scope="module")
def _one_compute_thread():
    """Torch in this process and the apps started by the suite use one thread (see helpers.QUIET_THREADS)."""
    import torch
    saved_threads = torch.get_num_threads()
    saved_env = {k: os.environ.get(k) for k in QUIET_THREADS}
    torch.set_num_threads(1)
    os.environ.update(QUIET_THREADS)
    yield
    torch.set_num_threads(saved_threads)
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
