"""The fast sampler's prefill runs each distinct prompt row once (components.fastgen `dedupe_prefill`).

RLOO/GRPO batches hold each prompt k times. With the dedupe on, greedy tokens, sampled tokens and log-probs under
one generator, and the hidden states `sample()` records, must equal those of the full prefill exactly (fp32; the
real embedded model, and tiny random Llama in both mask types, Qwen3, Gemma 2 and Phi-3), for rows that repeat
next to each other or apart; a batch where nothing repeats runs as before. No timing asserts
(bench/bench_sampler.py times it).
"""
from __future__ import annotations

import pytest
import torch

from rlhf_studio.components import fastgen
from rlhf_studio.components.fastgen import distinct_rows, fast_generate, left_pad
from rlhf_studio.components.training.engine.rollout import sample
from tests.test_fastgen import lm32, one_thread  # noqa: F401  (fixtures: the fp32 model, one thread)

PROMPTS = ["Say hi.", "Write a long poem about the sea and the sky and the wind."]


def tiny_model(arch: str = "llama", attn: str = "sdpa"):
    """A tiny random causal LM of tests/tiny_models.py's architecture `arch` (vocabulary 300, EOS 2, pad 1)."""
    from transformers import AutoModelForCausalLM
    from tests.tiny_models import _configs
    cfg = _configs(300)[arch][0]
    cfg.eos_token_id, cfg._attn_implementation = 2, attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():          # larger than the default init, so that the layers matter to the outputs
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def repeated(rows: list, order: list[int], pad: int):
    """The prompts `rows` (token lists) laid out in the given order, left-padded."""
    return left_pad([rows[i] for i in order], pad)


def both(fn):
    """fn(dedupe) with the dedupe on, then off, then on again (the second call reuses the cached KV buffers)."""
    on, off, again = fn(True), fn(False), fn(True)
    return on, off, again


def test_distinct_rows_numbers_prompts_by_first_appearance():
    ids = torch.tensor([[5, 6], [7, 8], [5, 6], [0, 8], [7, 8], [0, 8]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1], [1, 1], [1, 1]])   # rows 3 and 5: same ids, other mask
    first, rows = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 3, 5]
    assert rows.tolist() == [0, 1, 0, 2, 1, 3]


def test_dedupe_runs_on_cpu_eager_only(lm32):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fastgen._dedupes(None, cpu, False, lm32.model) is fastgen.DEDUPE_PREFILL is True
    assert not fastgen._dedupes(False, cpu, False, lm32.model)
    assert not fastgen._dedupes(True, cuda, True, lm32.model)      # the CUDA-graph path is left as it was
    assert not fastgen._dedupes(True, cuda, False, lm32.model)


def test_greedy_tokens_and_hidden_states_equal_on_the_real_model(lm32, monkeypatch):
    order = [0, 0, 1, 0, 1, 1, 0, 1]          # 2 prompts x 4, repeats next to each other and apart
    x, m = repeated([lm32.prompt_ids(p) for p in PROMPTS], order, lm32.pad_token_id)

    def run(dedupe):
        monkeypatch.setattr(fastgen, "DEDUPE_PREFILL", dedupe)
        return sample(lm32.model, x, m, 8, 1.0, 1.0, lm32.eos_token_id, lm32.pad_token_id, greedy=True,
                      capture_hidden=True)
    (r1, h1), (r0, h0), (r2, h2) = both(run)
    assert h0 is not None and h0.shape[:2] == r0.shape
    assert torch.equal(r1, r0) and torch.equal(r2, r0)
    assert torch.equal(h1, h0) and torch.equal(h2, h0)
    info = fast_generate(lm32.model, x, m, 2, temperature=0, eos_token_id=lm32.eos_token_id,
                         pad_token_id=lm32.pad_token_id).info
    assert info["prefill_rows"].tolist() == order   # it did dedupe


@pytest.mark.parametrize("arch,attn,top_p", [("llama", "sdpa", 1.0), ("llama", "eager", 0.9), ("qwen3", "sdpa", 0.9),
                                              ("gemma2", "eager", 1.0), ("phi3", "sdpa", 1.0)])
def test_sampled_tokens_and_logprobs_equal_on_tiny_models(arch, attn, top_p):
    model = tiny_model(arch, attn)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (7, 12, 4)]
    x, m = repeated(prompts, [2, 0, 1, 0, 2, 1, 1, 0, 2], pad=1)

    def run(dedupe):
        return fast_generate(model, x, m, 16, temperature=1.3, top_p=top_p, eos_token_id=2, pad_token_id=1,
                             generator=torch.Generator().manual_seed(7), return_logprobs=True,
                             dedupe_prefill=dedupe)
    on, off, again = both(run)
    assert on.info["prefill_rows"].tolist() == [0, 1, 2, 1, 0, 2, 2, 1, 0] and off.info["prefill_rows"] is None
    for out in (on, again):
        assert torch.equal(out.sequences, off.sequences)
        assert torch.equal(out.logprobs, off.logprobs)
    resp = off.response_ids
    assert len({tuple(r) for r in resp[[1, 3, 7]].tolist()}) > 1     # repeats of a prompt still sample apart


def test_no_repeated_rows_or_short_prompts_run_the_full_prefill():
    model = tiny_model()
    kw = dict(temperature=0, eos_token_id=2, pad_token_id=1)
    for prompts in ([[5, 6, 7, 9], [8, 9], [5, 6, 8, 9]],          # nothing repeats
                    [[5, 6, 7], [8, 9], [5, 6, 7]]):                # repeats, but under MIN_DEDUPE_PROMPT tokens
        x, m = left_pad(prompts, 1)
        on = fast_generate(model, x, m, 6, dedupe_prefill=True, **kw)
        assert on.info["prefill_rows"] is None
        assert torch.equal(on.sequences, fast_generate(model, x, m, 6, dedupe_prefill=False, **kw).sequences)
