import os
import sys

import pytest

# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`: a file's tests stay together,
# sharing its fixtures). These files are the longest (on a 2-core CPU); they go first, so that the two workers
# finish together instead of one running a long file alone at the end (`--no-loadscope-reorder`: else xdist
# orders the files by their number of tests).
LONGEST_FIRST = ["tests/test_ppo_learning.py", "tests/faults/test_load.py", "tests/test_watch_studio.py",
                 "tests/test_ppo_studio.py", "tests/test_train_browser.py", "tests/test_cluster.py",
                 "tests/test_cluster_ddp.py",
                 "tests/test_ppo_speedups.py", "tests/test_reward_learning.py", "tests/test_watch_proof.py",
                 "tests/test_reward_studio.py", "tests/test_reward_export.py", "tests/faults/test_app_faults.py",
                 "tests/test_architectures.py", "tests/test_fastgen.py", "tests/test_algorithms_studio.py",
                 "tests/test_app_browser.py", "tests/test_evaluation.py", "tests/test_job_channel.py",
                 "tests/faults/test_crash.py"]


def pytest_configure(config):
    """Under xdist, each worker and every process it starts (the app, PPO jobs) computes on one thread: two
    processes of two threads each on two cores spin against each other, which made the suite slower than one
    worker. A value the caller set is kept."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RLHF_STUDIO_TRAIN_THREADS"):
            os.environ.setdefault(var, "1")
        if "torch" in sys.modules:          # imported by a plugin before this hook: the variable came too late
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable: the rest keep order


@pytest.fixture
def fresh_store(tmp_path):
    """A new, migrated storage.Store on a DuckDB file under tmp_path (closed after the test)."""
    from rlhf_studio.storage import Store

    st = Store(tmp_path / "studio.duckdb")
    yield st
    st.close()


# ----------------------------------------------------------------------------- the real model, loaded once
@pytest.fixture(scope="session")
def lm():
    """The embedded SmolLM2-135M-Instruct (real weights), shared by the tests of one session."""
    from rlhf_studio.components.models import load_model

    return load_model("embedded")


@pytest.fixture
def studio(tmp_path, lm):
    """A Studio on a fresh DuckDB file, sharing the session's loaded model. Background deep-tier training off
    unless a test turns it on."""
    from tests.studios import open_studio
    with open_studio(tmp_path / "studio.duckdb", lm) as s:
        yield s
