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
def test_a_run_stored_before_the_split_resumes_where_it_stopped(tiny, algorithm, monkeypatch):
    from safetensors.torch import load
    blob = (FIXTURES / f"{algorithm}.safetensors").read_bytes()
    nxt = (FIXTURES / f"{algorithm}.next.safetensors").read_bytes()
    # the row layout and decode products the stored run's code used (padded rows, BLAS; the CPU's prompt tree and
    # packed decode weights came later: same math, other rounding, which Adam's normalised step turns into
    # differences above this test's tolerance on near-zero gradients)
    import rlhf_studio.components.fastgen as fastgen
    monkeypatch.setattr(fastgen, "PACK_DECODE", False)
    tr = trainer(tiny, algorithm, tree_rows=False)
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


def test_the_shuffled_pass_resumes_its_order_and_restarts_on_other_data():
    """One sampler for prompts and rows (engine/checkpoint.py), under the keys stored runs hold."""
    from rlhf_studio.components.training.engine.checkpoint import ShuffledPass
    a = ShuffledPass(5, torch.Generator().manual_seed(3), "prompts.perm", "prompt_pos", "n_prompts")
    first = a.take(7)                                   # one pass of 5 and two of the next
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and len(set(first[5:])) == 2
    t, meta = {}, {}
    a.save(t, meta)
    assert set(t) == {"prompts.perm"} and meta == {"prompt_pos": 2, "n_prompts": 5}
    b = ShuffledPass(5, torch.Generator().manual_seed(3), "prompts.perm", "prompt_pos", "n_prompts")
    b.gen.set_state(a.gen.get_state())
    b.load(t, meta)
    assert b.take(6) == a.take(6)                       # the rest of the pass, then the same reshuffle
    c = ShuffledPass(4, torch.Generator().manual_seed(3), "rows.perm", "row_pos", "n_rows")
    fresh = c.perm.clone()
    c.load({"rows.perm": torch.tensor([4, 3, 2, 1, 0])}, {"row_pos": 3, "n_rows": 5})
    assert torch.equal(c.perm, fresh) and c.pos == 0     # other data: its own order from the start


def test_a_stored_adapter_exports_merged_as_the_policy_it_was(studio, tmp_path):
    """The studio's merged export (studio/jobs.py) and the trainer's share one merge (engine/adapter.py): the
    merged folder loads with transformers alone and computes what base + adapter computes."""
    from transformers import AutoModelForCausalLM
    from rlhf_studio.components.adapters import pack_adapter_dir
    from rlhf_studio.components.models import load_model
    from rlhf_studio.components.training.engine.adapter import save_adapter_folder
    from tests.layers import attach_moved_policy
    own = attach_moved_policy(load_model("embedded", device="cpu", dtype="fp32"), 4, 8, "exported")
    model = own.model
    folder = save_adapter_folder(own, model, "exported", tmp_path / "adapter")
    aid = studio.store.add_adapter("exported", pack_adapter_dir(folder), {}, base_model_id=studio.model_id)
    merged = studio.export_adapter(aid, str(tmp_path / "merged"), merged=True)
    ids = own.tokenizer("Name a fruit, please.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3                      # the adapter changes the outputs...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # ...and the merged model computes them
