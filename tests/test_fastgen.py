"""Fast rollout generation (components.fastgen) on the CPU with the real embedded model in fp32.

Greedy outputs must equal `model.generate(do_sample=False)` token for token (left-padded batch, rows ending at
different steps), also with a LoRA adapter active (merged for the rollout vs unmerged `generate`); returned
log-probs must equal a full forward recomputation; sampling must be reproducible with a generator and follow the
distribution of transformers' own temperature / top-p processors. No timing asserts.
"""
from __future__ import annotations

import contextlib
import copy
import math
import types

import pytest
import torch

from rlhf_studio.components.fastgen import (FastGenerator, fast_generate, generate_rollouts, left_pad, plain_generate,
                                 select_tokens)

N_NEW = 12
PROMPTS = ["Say hi.", "What is 2+2? Answer with a number only.",
           "Write a long poem about the sea and the sky and the wind.", "Name one colour."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-4 decoding of a 135M model gains nothing from threads, and on a shared CPU several threads per
    process can make every op wait on the others (seconds per forward); restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm32():
    from rlhf_studio.components.models import load_model
    return load_model("embedded", dtype="fp32")


@pytest.fixture(scope="module")
def batch(lm32):
    ids = [lm32.prompt_ids(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1          # different lengths: real left padding
    return left_pad(ids, lm32.pad_token_id)


def hf_greedy(model, lm, x, m, n=N_NEW):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=m, do_sample=False, max_new_tokens=n,
                              eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id)


def fast_greedy(model, lm, x, m, n=N_NEW, **kw):
    return fast_generate(model, x, m, n, temperature=0, eos_token_id=lm.eos_token_id,
                         pad_token_id=lm.pad_token_id, **kw)


@pytest.fixture(scope="module")
def base_ref(lm32, batch):
    x, m = batch
    return hf_greedy(lm32.model, lm32, x, m)


def eos_steps(resp, eos):
    return [row.index(eos) if eos in row else None for row in resp.tolist()]


def test_greedy_equals_generate(lm32, batch, base_ref):
    x, m = batch
    out = fast_greedy(lm32.model, lm32, x, m, return_logprobs=True)
    assert out.info["path"] == "eager" and out.info["merged"] is False
    steps = eos_steps(base_ref[:, x.shape[1]:], lm32.eos_token_id)
    assert len({s for s in steps if s is not None}) >= 2 and None in steps   # rows end at different steps
    assert out.sequences.shape == base_ref.shape
    assert torch.equal(out.sequences, base_ref)
    # response mask: 1 up to and including EOS; pad after it
    for row, s in enumerate(steps):
        mask = out.response_mask[row].tolist()
        if s is None:
            assert all(mask)
        else:
            assert mask == [1] * (s + 1) + [0] * (len(mask) - s - 1)
            assert set(out.response_ids[row, s + 1:].tolist()) <= {lm32.pad_token_id}
    assert out.logprobs.shape == out.response_mask.shape
    assert bool((out.logprobs[out.response_mask == 0] == 0).all())
    assert bool((out.logprobs[out.response_mask == 1] <= 0).all())

    # the cached bucket is reused by the next call (same batch and length bucket): stale KV slots must not leak
    xr, mr = x.flip(0), m.flip(0)
    again = fast_greedy(lm32.model, lm32, xr, mr)
    assert torch.equal(again.sequences, hf_greedy(lm32.model, lm32, xr, mr))


def test_greedy_short_budget_and_single_row(lm32, batch, base_ref):
    x, m = batch
    T = x.shape[1]
    one = fast_greedy(lm32.model, lm32, x, m, n=1)
    assert torch.equal(one.sequences, base_ref[:, :T + 1])
    ids = lm32.prompt_ids(PROMPTS[1])
    xs = torch.tensor([ids])
    ref = hf_greedy(lm32.model, lm32, xs, torch.ones_like(xs))
    assert torch.equal(fast_greedy(lm32.model, lm32, xs, None).sequences, ref)


def test_eager_attention_mask_path(lm32, batch):
    x, m = batch
    x, m = x[:2], m[:2]
    model = lm32.model
    model.set_attn_implementation("eager")
    try:
        ref = hf_greedy(model, lm32, x, m, n=6)
        got = fast_greedy(model, lm32, x, m, n=6)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got.sequences, ref)


@pytest.fixture(scope="module")
def peft_model(lm32):
    from peft import LoraConfig, get_peft_model
    base = copy.deepcopy(lm32.model)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)                          # LoRA A's init: the same adapter on every run
        pm = get_peft_model(base, cfg, adapter_name="policy")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.eval()
    return pm


def test_lora_merged_fast_path_equals_unmerged_generate(lm32, batch, base_ref, peft_model):
    x, m = batch
    ref = hf_greedy(peft_model, lm32, x, m)
    assert not torch.equal(ref, base_ref)            # the adapter changes the outputs
    from peft.tuners.lora import LoraLayer
    layers = [mod for mod in peft_model.modules() if isinstance(mod, LoraLayer)]
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "base_layer" in n}
    assert before
    out = fast_greedy(peft_model, lm32, x, m)
    assert out.info["merged"] is True
    assert torch.equal(out.sequences, ref)
    # unmerged afterwards, base weights restored bit for bit
    assert not any(layer.merged for layer in layers)
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())
    # adapter disabled: base outputs, nothing merged
    with peft_model.disable_adapter():
        off = fast_greedy(peft_model, lm32, x, m)
    assert off.info["merged"] is False
    assert torch.equal(off.sequences, base_ref)
    # merge switched off: the unmerged LoRA forward gives the same tokens
    assert torch.equal(fast_greedy(peft_model, lm32, x, m, merge_lora=False).sequences, ref)


def recompute_logprobs(model, out, prompt_mask, temperature):
    T = out.prompt_length
    R = out.response_mask.shape[1]
    mask = torch.cat([prompt_mask, out.response_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=mask, position_ids=pos).logits.float()
    lp = torch.log_softmax(logits[:, T - 1:T - 1 + R] / temperature, -1)
    return lp.gather(-1, out.response_ids.unsqueeze(-1)).squeeze(-1)


def test_sampled_logprobs_match_forward_and_are_reproducible(lm32, batch, peft_model):
    x, m = batch
    kw = dict(temperature=0.8, top_p=0.9, eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id,
              return_logprobs=True)
    a = fast_generate(peft_model, x, m, 8, generator=torch.Generator().manual_seed(123), **kw)
    b = fast_generate(peft_model, x, m, 8, generator=torch.Generator().manual_seed(123), **kw)
    c = fast_generate(peft_model, x, m, 8, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    ref = recompute_logprobs(peft_model, a, m, 0.8)     # unmerged LoRA, full forward
    sel = a.response_mask.bool()
    assert torch.allclose(a.logprobs[sel], ref[sel], atol=2e-4, rtol=0), (a.logprobs[sel] - ref[sel]).abs().max()


def hf_probs(logits, temperature, top_p):
    """Sampling distribution of transformers' own processors (temperature, then top-p)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    s = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        s = TopPLogitsWarper(top_p)(None, s)
    return torch.softmax(s, -1)


def chi2(counts: torch.Tensor, probs: torch.Tensor, n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square over bins with expected count >= min_expected (the rest pooled); (stat, dof)."""
    exp = probs.double() * n
    big = exp >= min_expected
    obs_b, exp_b = counts.double()[big], exp[big]
    rest_o, rest_e = counts.double()[~big].sum(), exp[~big].sum()
    if rest_e >= min_expected:
        obs_b, exp_b = torch.cat([obs_b, rest_o.view(1)]), torch.cat([exp_b, rest_e.view(1)])
    else:
        assert rest_o <= max(3 * rest_e, 10), "mass where there should be (almost) none"
    return float(((obs_b - exp_b) ** 2 / exp_b).sum()), int(obs_b.numel()) - 1


def chi2_bound(dof: int) -> float:
    # Wilson-Hilferty upper quantile at z = 4.75 (p ~ 1e-6): a real mismatch fails, noise never does
    z = 4.75
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.5, 0.8)])
def test_select_tokens_distribution(temperature, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0, -3.0, float("-inf")])
    n = 200_000
    u = torch.rand(n, generator=g)
    mode = "sample" if top_p >= 1 else "top_p"
    tok, lp = select_tokens(logits.expand(n, -1).contiguous(), u, mode, torch.tensor(temperature),
                            torch.tensor(top_p))
    counts = torch.bincount(tok, minlength=logits.numel())
    p = hf_probs(logits.unsqueeze(0), temperature, top_p)[0]
    assert counts[p == 0].sum() == 0                    # outside the nucleus / -inf: never drawn
    stat, dof = chi2(counts, p, n)
    assert stat < chi2_bound(dof), (stat, dof, counts, p * n)
    full = torch.log_softmax(logits / temperature, -1)
    assert torch.allclose(lp, full[tok])


def test_first_token_distribution_through_the_model(lm32):
    """Empirical frequencies of the first sampled token vs transformers' processors on the same logits."""
    tok = lm32.tokenizer
    ids = tok("The weather today is", add_special_tokens=False)["input_ids"]
    B = 384
    x = torch.tensor([ids] * B)
    temperature, top_p = 1.3, 0.95
    out = fast_generate(lm32.model, x, None, 1, temperature=temperature, top_p=top_p,
                        eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id,
                        generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = lm32.model(input_ids=x[:1]).logits[:, -1].float()
    p = hf_probs(logits, temperature, top_p)[0]
    counts = torch.bincount(out.response_ids[:, 0], minlength=p.numel())
    assert counts[p == 0].sum() <= 2        # fp ties at the nucleus edge at most
    stat, dof = chi2(counts, p, B)
    assert dof >= 3
    assert stat < chi2_bound(dof), (stat, dof)


def test_generate_rollouts_switch(lm32, monkeypatch):
    prompts = [lm32.prompt_ids(p) for p in PROMPTS[:2]]
    fast = generate_rollouts(lm32, prompts, max_new_tokens=4, temperature=0)
    slow = generate_rollouts(lm32, prompts, max_new_tokens=4, temperature=0, use_fast=False)
    assert fast.info["path"] == "eager" and slow.info["path"] == "generate"
    assert torch.equal(fast.sequences, slow.sequences)
    assert torch.equal(fast.response_mask, slow.response_mask)
    monkeypatch.setenv("RLHF_STUDIO_FASTGEN", "0")
    off = generate_rollouts(lm32, prompts, max_new_tokens=4, temperature=0.9, return_logprobs=True,
                            generator=torch.Generator().manual_seed(3))
    assert off.info["path"] == "generate" and off.logprobs.shape == off.response_mask.shape
    again = generate_rollouts(lm32, prompts, max_new_tokens=4, temperature=0.9, return_logprobs=True,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(off.sequences, again.sequences)


def test_plain_generate_logprobs_match_fast(lm32, batch):
    x, m = batch
    kw = dict(temperature=0, eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id, return_logprobs=True)
    a = plain_generate(lm32.model, x[:2], m[:2], 5, **kw)
    b = fast_generate(lm32.model, x[:2], m[:2], 5, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_fast_generator_reset_and_validation(lm32, batch):
    x, m = batch
    g = FastGenerator(lm32.model, max_graphs=1)
    kw = dict(temperature=0, eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id)
    a = g.generate(x[:1], m[:1], 3, **kw)
    g.generate(x[:2], m[:2], 3, **kw)                 # another bucket evicts the first (max_graphs=1)
    assert len(g._states) == 1
    g.reset()
    assert not g._states
    assert torch.equal(g.generate(x[:1], m[:1], 3, **kw).sequences, a.sequences)
    with pytest.raises(ValueError):
        g.generate(x[:1], m[:1], 3, temperature=0, eos_token_id=5, pad_token_id=5)
    with pytest.raises(ValueError):
        g.generate(x[:1], torch.zeros_like(m[:1]), 3, **kw)


def test_a_longer_cached_bucket_serves_shorter_prompts(lm32, batch):
    """Varying prompt lengths share one cached bucket (and so one captured graph) when it is at most twice the
    length needed, with the same greedy tokens as `generate`; a far longer one is not used."""
    x, m = batch
    g = FastGenerator(lm32.model, max_graphs=2)
    kw = dict(temperature=0, eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id)
    long_ids = lm32.prompt_ids(" ".join(PROMPTS * 2))
    assert 64 < len(long_ids) + 3 <= 128 and x.shape[1] + 3 <= 64
    lx = torch.tensor([long_ids] * 4)
    assert g.generate(lx, torch.ones_like(lx), 3, **kw).info["bucket"] == (4, 128)
    short = g.generate(x, m, 3, **kw)
    assert short.info["bucket"] == (4, 128) and len(g._states) == 1
    assert torch.equal(short.sequences, hf_greedy(lm32.model, lm32, x, m, n=3))
    g.reset()
    very_long = lm32.prompt_ids(" ".join(PROMPTS * 8))
    vx = torch.tensor([very_long] * 4)
    assert g.generate(vx, torch.ones_like(vx), 3, **kw).info["bucket"][1] > 128
    assert g.generate(x, m, 3, **kw).info["bucket"] == (4, 64) and len(g._states) == 2


@pytest.fixture
def simulated_cuda_graphs(monkeypatch):
    """Run the CUDA-graph code path on the CPU: capture records the step without running it (as a real capture
    does), replay runs it; warm-up, state snapshot/restore, sync_every and trimming are exercised for real."""
    import rlhf_studio.components.fastgen as fg
    capturing = {"g": None}
    real_step = fg._State.decode_step

    class Graph:
        def __init__(self):
            self.st = None
            self.replays = 0

        def replay(self):
            self.replays += 1
            real_step(self.st)

    @contextlib.contextmanager
    def graph(g, **kw):
        capturing["g"] = g
        try:
            yield
        finally:
            capturing["g"] = None

    def step(self):
        if capturing["g"] is not None:
            capturing["g"].st = self
            return
        real_step(self)

    monkeypatch.setattr(fg._State, "decode_step", step)
    monkeypatch.setattr(fg, "_graphs_supported", lambda device: True)
    fake_stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: fake_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: fake_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return types.SimpleNamespace(module=fg, monkeypatch=monkeypatch)


def test_graph_path_bookkeeping_simulated(lm32, batch, base_ref, simulated_cuda_graphs):
    x, m = batch
    kw = dict(eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id)
    gen = FastGenerator(lm32.model, sync_every=5)
    out = gen.generate(x, m, N_NEW, temperature=0, **kw)
    assert out.info["path"] == "cuda_graph"
    assert torch.equal(out.sequences, base_ref)           # warm-up side effects undone, extra steps trimmed
    (st,) = gen._states.values()
    assert st.graph.replays == N_NEW - 1
    # sampled: graph replay and the eager loop consume the same uniforms -> the same tokens
    skw = dict(temperature=0.9, top_p=0.9, return_logprobs=True, **kw)
    a = gen.generate(x, m, 8, generator=torch.Generator().manual_seed(11), **skw)
    b = fast_generate(lm32.model, x, m, 8, generator=torch.Generator().manual_seed(11), use_cuda_graph=False, **skw)
    assert a.info["path"] == "cuda_graph" and b.info["path"] == "eager"
    assert torch.equal(a.sequences, b.sequences) and torch.allclose(a.logprobs, b.logprobs)


def test_graph_capture_failure_falls_back_to_eager(lm32, batch, base_ref, simulated_cuda_graphs):
    x, m = batch

    class Broken:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    simulated_cuda_graphs.monkeypatch.setattr(torch.cuda, "CUDAGraph", Broken)
    gen = FastGenerator(lm32.model)
    assert gen.capture_failure is None
    out = gen.generate(x, m, N_NEW, temperature=0, eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id)
    assert out.info["path"] == "eager"
    assert torch.equal(out.sequences, base_ref)
    assert gen.capture_failure == "RuntimeError: operation not permitted when stream is capturing"   # for notes
    from rlhf_studio.components.fastgen import get_fast_generator, graph_capture_failure, release_fast_generators
    try:                                       # the cached generator of a model, as PPO's notes read it
        assert graph_capture_failure(lm32.model) is None
        fast_generate(lm32.model, x, m, N_NEW, temperature=0, eos_token_id=lm32.eos_token_id,
                      pad_token_id=lm32.pad_token_id)
        assert graph_capture_failure(lm32.model) == gen.capture_failure
    finally:
        release_fast_generators(lm32.model)
    assert graph_capture_failure(lm32.model) is None and get_fast_generator(lm32.model).capture_failure is None


def test_quantized_base_decodes_eagerly_unless_graphs_are_asked_for(lm32, batch, base_ref, simulated_cuda_graphs):
    # A bitsandbytes 8-bit matmul cannot be captured, and a failed capture leaves CUDA's RNG mid-capture for
    # the rest of the process (seen on an H200): quantized bases skip the capture unless use_cuda_graph=True.
    x, m = batch
    kw = dict(temperature=0, eos_token_id=lm32.eos_token_id, pad_token_id=lm32.pad_token_id)
    simulated_cuda_graphs.monkeypatch.setattr(lm32.model, "hf_quantizer", object(), raising=False)
    out = FastGenerator(lm32.model).generate(x, m, N_NEW, **kw)
    assert out.info["path"] == "eager" and torch.equal(out.sequences, base_ref)
    out = FastGenerator(lm32.model).generate(x, m, N_NEW, use_cuda_graph=True, **kw)
    assert out.info["path"] == "cuda_graph" and torch.equal(out.sequences, base_ref)


def test_quantized_detects_bitsandbytes_layers():
    bnb = pytest.importorskip("bitsandbytes")
    from rlhf_studio.components.fastgen import quantized_base
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert not quantized_base(plain)
    assert quantized_base(torch.nn.Sequential(torch.nn.Linear(8, 8), bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)))
