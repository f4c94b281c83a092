"""Runs stored before the engine/algorithm split still load and resume: each checkpoint in
tests/fixtures/stored_runs/ (written by the code before the split, tests/stored_runs.py) is loaded into today's
trainer, which then takes the step the stored run took next: the same adapter weights and metrics."""
from __future__ import annotations

import json

import pytest
import torch

from tests.stored_runs import COMPARED, FIXTURES, SETTINGS, adapter_tensors, tiny_llama, trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, lm):
    torch.set_num_threads(1)
    return tiny_llama(tmp_path_factory.mktemp("stored") / "llama", lm.source_path)


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_a_run_stored_before_the_split_resumes_where_it_stopped(tiny, algorithm):
    from safetensors.torch import load
    blob = (FIXTURES / f"{algorithm}.safetensors").read_bytes()
    nxt = (FIXTURES / f"{algorithm}.next.safetensors").read_bytes()
    tr = trainer(tiny, algorithm)
    fresh = adapter_tensors(tr)
    meta = tr.load_state_bytes(blob)
    assert meta["step"] == 1 and tr.step_count == 1
    loaded = adapter_tensors(tr)
    assert any(not torch.equal(fresh[k], loaded[k]) for k in fresh)        # the stored adapter, not a fresh one
    m = tr.step()
    assert tr.step_count == 2
    expected = json.loads(json.loads(nxt[8:8 + int.from_bytes(nxt[:8], "little")])["__metadata__"]["metrics"])
    for k in COMPARED[algorithm]:
        assert m[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-6), k
    after, want = adapter_tensors(tr), load(nxt)
    assert set(after) == set(want)
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-4, atol=1e-6)
