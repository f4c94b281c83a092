import pytest


@pytest.fixture
def fresh_store(tmp_path):
    """A new, migrated storage.Store on a DuckDB file under tmp_path (closed after the test)."""
    from storage import Store

    st = Store(tmp_path / "studio.duckdb")
    yield st
    st.close()


# ----------------------------------------------------------------------------- the real model, loaded once
@pytest.fixture(scope="session")
def lm():
    """The embedded SmolLM2-135M-Instruct (real weights), shared by the tests of one session."""
    from components.models import load_model

    return load_model("embedded")


@pytest.fixture
def studio(tmp_path, lm):
    """A Studio on a fresh DuckDB file, sharing the session's loaded model. Background deep-tier training off
    unless a test turns it on."""
    from studio import Studio

    s = Studio(str(tmp_path / "studio.duckdb"), model=lm)
    s.reward.settings.deep_every = 0
    yield s
    s.close()
