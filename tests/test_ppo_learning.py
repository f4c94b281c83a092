"""PPO on the real embedded model (SmolLM2-135M-Instruct, fp32, CPU) against a real reward model.

The reward model is a linear Bradley-Terry head (components.reward.fast.FastRewardModel, served to PPO through
components.reward.ppo_reward) fitted on pooled base features of the base model's own samples, labelled by a
synthetic preference: the shorter of two responses is preferred (a response cut at the token limit counts as
longest). PPO must raise the reward of held-out prompts clearly above the base policy's and above a control run
whose reward scores are shuffled (the missing-EOS penalty alone also favours shorter answers), with a bounded KL. Also: a state_bytes checkpoint resumes identically, and
save_adapter folders load with peft / transformers and generate. The training-mechanics tests (resume, stop,
compiled and packed passes, non-finite gradients, seeds) run on the model's first 6 decoder layers.
"""
from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

from tests.layers import keep_first_layers

pytestmark = pytest.mark.slow

TRAIN_PROMPTS = [
    "Give me one tip for writing a clear email.", "Explain photosynthesis to a child.",
    "Write a haiku about autumn.", "What is a good name for a cat?", "How do I boil an egg?",
    "Summarise the plot of Hamlet in one sentence.", "Why is the sky blue?", "Suggest a weekend hobby.",
    "What is the capital of Australia?", "Describe the smell of rain.", "How can I sleep better?",
    "Tell me a fun fact about octopuses.", "What should I cook tonight?", "Explain recursion briefly.",
    "Give a motivational quote.", "How do plants drink water?", "What is a black hole?",
    "How do I make my code faster?", "Recommend a book for a long flight.", "What does a bee do all day?",
    "How do I stay focused while studying?", "What is inflation?", "Name a healthy breakfast.",
    "Why do cats purr?",
]
HELDOUT_PROMPTS = [
    "What is the tallest mountain on Earth?", "How do I water a cactus?", "Give me a tip for public speaking.",
    "What is a good gift for a friend?", "Why do leaves change colour?", "How do airplanes fly?",
    "What is the best way to learn a language?", "Describe a sunset.", "How do I start running?",
    "What is gravity?", "Suggest a name for a dog.", "How can I save money?",
    "What is a volcano?", "Write a short greeting for a birthday card.", "What do penguins eat?",
    "How do I fold a paper plane?",
]


@pytest.fixture(scope="module")
def lm32():
    """A private fp32 copy of the embedded model: PPO wraps lm.model in a PeftModel, so no sharing."""
    from rlhf_studio.components.models import load_model
    return load_model("embedded", dtype="fp32")


SHORT_LAYERS = 6


@pytest.fixture(scope="module")
def lm_short():
    """Another private fp32 copy, cut to its first decoder layers (tests.layers.keep_first_layers), for the
    training mechanics below: resuming, stopping, compiled and packed passes, non-finite gradients, seeds."""
    from rlhf_studio.components.models import load_model
    return keep_first_layers(load_model("embedded", dtype="fp32"), SHORT_LAYERS)


# ------------------------------------------------------------------------------------------------------------
# A real reward model on a synthetic preference
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_with_features(lm, prompts, max_new_tokens, temperature, seed):
    """Base-model samples and their pooled base features, exactly as the PPO reward sees them."""
    from rlhf_studio.components.training.engine.rollout import encode_prompts, forward_response, left_pad, mask_after_eos, sample
    from rlhf_studio.components.reward.features import pool_features
    torch.manual_seed(seed)
    q, qm = left_pad(encode_prompts(lm, prompts, 256), lm.pad_token_id)
    resp = sample(lm.model, q, qm, max_new_tokens, temperature, 1.0, lm.eos_token_id, lm.pad_token_id)
    rm, has_eos = mask_after_eos(resp, lm.eos_token_id)
    resp = torch.where(rm.bool(), resp, torch.full_like(resp, lm.pad_token_id))
    fo = forward_response(lm.model, q, qm, resp, rm, temperature, want_hidden=True)
    am = torch.cat([qm, rm], 1)
    feats = pool_features(fo.hidden, am, torch.cat([torch.zeros_like(qm), rm], 1))
    # a response cut at the limit is "longest": it would have gone on
    length = rm.sum(1).float() + (~has_eos).float() * max_new_tokens
    return feats, length


def fit_length_reward(lm, prompts, n_per_prompt=2, max_new_tokens=32, seed=0):
    """FastRewardModel on pairs (shorter chosen) of the base model's samples -> its PPO reward function."""
    from rlhf_studio.components.reward.fast import FastRewardModel
    from rlhf_studio.components.reward.ppo_reward import reward_fn_for_ppo
    feats, lens = [], []
    for k in range(n_per_prompt):
        for s in range(0, len(prompts), 12):
            f, n = sample_with_features(lm, prompts[s:s + 12], max_new_tokens, 1.0, seed * 100 + k * 10 + s)
            feats.append(f)
            lens.append(n)
    X, L = torch.cat(feats), torch.cat(lens)
    pairs = [(i, j) for i, j in itertools.permutations(range(len(L)), 2) if L[i] + 4 <= L[j]]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pairs), generator=g)[:600].tolist()
    ci = torch.tensor([pairs[p][0] for p in pick])
    ri = torch.tensor([pairs[p][1] for p in pick])
    rm = FastRewardModel().fit(X[ci], X[ri], X_ref=X)
    reward = reward_fn_for_ppo(rm, lm)
    assert reward.uses_base_hidden      # scored from the trainer's reference pass, no forward of its own
    return reward, X, L


class ControlReward:
    """The control of the learning test: `reward`'s scores with their link to the text cut, by shuffling them
    across each batch ("shuffled") or replacing them by zeros ("zero"). Everything else of the run stays: the
    trainer's missing-EOS penalty, the KL penalty, the settings, the seed."""

    def __init__(self, reward, mode: str, seed: int):
        self.reward, self.mode = reward, mode
        self.uses_base_hidden = reward.uses_base_hidden
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, **batch):
        scores = self.reward(**batch)
        if self.mode == "zero":
            return torch.zeros_like(scores)
        return scores[torch.randperm(scores.numel(), generator=self.gen)]


def heldout_score(trainer, prompts, use_base, seed, repeats=1):
    """Mean raw reward-model score (and KL-free stats) of fresh samples on held-out prompts."""
    torch.manual_seed(seed)
    rows = []
    for _ in range(repeats):
        rows += trainer.generate_samples(prompts, use_base=use_base, batch_size=16)
    return (sum(r["score"] for r in rows) / len(rows), sum(r["length"] for r in rows) / len(rows),
            sum(r["has_eos"] for r in rows) / len(rows))


# ------------------------------------------------------------------------------------------------------------
# It learns
# ------------------------------------------------------------------------------------------------------------

def learning_run(lm, reward_fn, judge, steps: int, seed: int = 0, base_too: bool = False):
    """A short PPO run with `reward_fn` on TRAIN_PROMPTS, judged by `judge` (the real reward model) on
    HELDOUT_PROMPTS: (held-out (score, length, eos share) after training, the history, and before training
    from the base model when base_too)."""
    from rlhf_studio.components.training.ppo_config import PPOConfig
    from rlhf_studio.components.training.ppo import PPOTrainer
    # The value head starts at zero in both runs: started from the reward head, it would hand the true reward
    # to the control run as its baseline (advantages = shuffled score - true value), and the control would
    # learn from it.
    cfg = PPOConfig(steps=steps, batch_size=8, mini_batch_size=8, ppo_epochs=2, max_new_tokens=32, temperature=1.0,
                    lr=2e-3, kl_coef=0.02, missing_eos_penalty=1.0, value_head_init="zeros", seed=seed)
    trainer = PPOTrainer(lm, reward_fn, cfg, TRAIN_PROMPTS)
    trainer.reward_fn = judge
    base = heldout_score(trainer, HELDOUT_PROMPTS, use_base=True, seed=123) if base_too else None
    trainer.reward_fn = reward_fn
    history = trainer.train()
    assert len(history) == cfg.steps
    for m in history:
        for k in ("policy_loss", "value_loss", "kl", "entropy", "approx_kl", "reward_mean"):
            assert math.isfinite(m[k]), (k, m)
    trainer.reward_fn = judge
    return heldout_score(trainer, HELDOUT_PROMPTS, use_base=False, seed=123), history, base


def test_ppo_learns_the_reward_beyond_a_control_run(lm32):
    """PPO must raise the held-out reward clearly above what a control run reaches under the same settings, seed
    and missing-EOS penalty with the reward-model scores shuffled across each batch: what the policy gains beyond
    the control comes from the reward reaching the trainer, not from the EOS penalty or from moving at all."""
    reward, X, L = fit_length_reward(lm32, TRAIN_PROMPTS)
    # the reward model really encodes the preference: its scores fall with length on its training samples
    sc = ((X - reward.mean) / reward.std) @ reward.weight + reward.bias
    corr = torch.corrcoef(torch.stack([sc, -L]))[0, 1].item()
    assert corr > 0.5, corr
    spread = float(((X - reward.mean) / reward.std @ reward.weight).std())

    # Margins over seeds (one thread; the trajectory also depends on the thread count, through the order of
    # floating-point sums): bench/bench_learning_margin.py, figures in docs/LEARNING.md.
    steps = 4
    (ppo, ppo_len, ppo_eos), history, (base, base_len, base_eos) = learning_run(lm32, reward, reward, steps,
                                                                               base_too=True)
    (ctl, ctl_len, ctl_eos), ctl_history, _ = learning_run(lm32, ControlReward(reward, "shuffled", 0), reward, steps)
    print(f"\nheld-out score (score std {spread:.2f}): base {base:.2f} (len {base_len:.1f}, eos {base_eos:.2f}); "
          f"PPO {ppo:.2f} (len {ppo_len:.1f}, eos {ppo_eos:.2f}); control {ctl:.2f} (len {ctl_len:.1f}, eos "
          f"{ctl_eos:.2f}); kl {[round(m['kl'], 1) for m in history]}, control {[round(m['kl'], 1) for m in ctl_history]}")
    assert ppo > ctl + 1.0 * spread, (ppo, ctl, spread)
    assert ppo > base + 1.0 * spread, (ppo, base, spread)
    assert max(m["kl"] for m in history) < 25.0


# ------------------------------------------------------------------------------------------------------------
# Checkpoints resume identically; exported adapters load and generate
# ------------------------------------------------------------------------------------------------------------

def small_trainer(lm, **kw):
    from rlhf_studio.components.training.ppo_config import PPOConfig
    from rlhf_studio.components.training.rewards import LinearHeadReward
    from rlhf_studio.components.training.ppo import PPOTrainer
    H = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(7)
    reward = LinearHeadReward(torch.randn(2 * H, generator=g) / H, 0.1)
    cfg = PPOConfig(**{**dict(steps=4, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8,
                              temperature=1.0, lr=1e-3, adaptive_kl=True, kl_coef=0.05, kl_horizon=100, seed=3),
                       **kw})
    return PPOTrainer(lm, reward, cfg, TRAIN_PROMPTS)


def test_state_bytes_resume_is_identical(lm_short):
    from rlhf_studio.components.model_utils import safetensors_metadata
    a = small_trainer(lm_short)
    a.step()
    blob = a.state_bytes()
    assert isinstance(blob, bytes) and "ppo_state" in safetensors_metadata(blob)
    expected = a.step()
    expected_adapter = a.adapter_bytes()

    # as a CUDA run writes it (fused AdamW): the optimizer implementation stays this device's
    from safetensors.torch import load, save
    meta_json = json.loads(safetensors_metadata(blob)["ppo_state"])
    assert meta_json["optim_groups"][0].get("fused") is None
    for g in meta_json["optim_groups"]:
        g["fused"] = True
    cuda_blob = save(load(blob), metadata={"format": "pt", "ppo_state": json.dumps(meta_json)})

    b = small_trainer(lm_short, seed=99)          # a fresh adapter, another seed: everything must come from the blob
    meta = b.load_state_bytes(cuda_blob)
    assert meta["step"] == 1 and b.step_count == 1
    assert not any(g.get("fused") for g in b.optimizer.param_groups)
    got = b.step()
    for k, v in expected.items():
        if k.startswith("t_") or k == "samples_per_s":
            continue
        if k == "samples":
            assert [s["response"] for s in got[k]] == [s["response"] for s in v]
            continue
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    got_adapter, want_adapter = load(b.adapter_bytes()), load(expected_adapter)
    assert got_adapter.keys() == want_adapter.keys()
    for k in want_adapter:
        assert torch.equal(got_adapter[k], want_adapter[k]), k
    assert got["kl_coef"] != 0.05 or expected["kl_coef"] == 0.05   # the adaptive beta came from the blob
    with pytest.raises(ValueError):
        b.load_state_bytes(b"definitely not a checkpoint")


def test_train_loop_stop_and_checkpoint_callback(lm_short):
    tr = small_trainer(lm_short, steps=3, checkpoint_every=1, ppo_epochs=1)
    seen, blobs = [], []
    hist = tr.train(callback=seen.append, stop=lambda: len(seen) >= 2,
                    on_checkpoint=lambda b, s: blobs.append(s))
    assert len(hist) == 2 and [m["step"] for m in seen] == [1, 2] and blobs == [1, 2]
    m = seen[-1]
    for k in ("reward_mean", "reward_std", "score_mean", "kl", "entropy", "policy_loss", "value_loss", "clip_frac",
              "approx_kl", "response_len", "eos_frac", "lr", "t_generate", "t_score", "t_reference", "t_train",
              "samples_per_s", "samples"):
        assert k in m, k
    assert 1 <= m["response_len"] <= 8 and 0 <= m["eos_frac"] <= 1
    assert m["samples"] and {"prompt", "response", "reward"} <= set(m["samples"][0])


def test_save_adapter_loads_with_peft_and_merged(lm32, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from rlhf_studio.components.training.engine.adapter import generate_with_adapter
    tr = small_trainer(lm32, steps=1, ppo_epochs=1, lr=3e-3)
    tr.step()
    ids = torch.tensor([lm32.prompt_ids("Name a colour.") + [504, 3240, 28]])
    with torch.no_grad():
        policy_logits = lm32.model(input_ids=ids).logits
        with lm32.model.disable_adapter():
            base_logits = lm32.model(input_ids=ids).logits
    assert (policy_logits - base_logits).abs().max() > 1e-3      # the adapter learned something

    folder = tr.save_adapter(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(lm32.source_path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, policy_logits, atol=1e-4)
        out = loaded.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=lm32.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    del loaded, base

    merged = tr.save_adapter(tmp_path / "merged", merged=True)
    m = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, policy_logits, atol=1e-3)
    del m

    texts = generate_with_adapter(lm32, ["Name a colour."], "policy", max_new_tokens=6, greedy=True)
    base_texts = generate_with_adapter(lm32, ["Name a colour."], None, max_new_tokens=6, greedy=True)
    assert len(texts) == 1 and isinstance(texts[0], str) and isinstance(base_texts[0], str)
    assert lm32.model.active_adapter == "policy"


@pytest.mark.parametrize("fastgen", ["1", "0"], ids=["fast-sampler", "generate"])
def test_generation_hidden_states_match_a_forward(lm32, fastgen, monkeypatch):
    """old_logprobs="generation" reads the heads off the hidden states recorded while sampling; in fp32 they must
    equal a fresh forward over prompt + response (the first PPO ratio is then 1 to rounding), with either sampler."""
    monkeypatch.setenv("RLHF_STUDIO_FASTGEN", fastgen)
    from rlhf_studio.components.training.engine.rollout import encode_prompts, forward_response, heads_on_hidden, left_pad, \
        mask_after_eos, sample
    from rlhf_studio.components.model_utils import causal_lm_of
    torch.manual_seed(0)
    q, qm = left_pad(encode_prompts(lm32, TRAIN_PROMPTS[:4], 256), lm32.pad_token_id)
    resp, hidden = sample(lm32.model, q, qm, 12, 1.0, 1.0, lm32.eos_token_id, lm32.pad_token_id,
                          capture_hidden=True)
    assert hidden is not None and hidden.shape[:2] == resp.shape
    rm, _ = mask_after_eos(resp, lm32.eos_token_id)
    resp = torch.where(rm.bool(), resp, torch.full_like(resp, lm32.pad_token_id))
    with torch.no_grad():
        a = heads_on_hidden(causal_lm_of(lm32.model).get_output_embeddings(), hidden, resp, 0.7)
        b = forward_response(lm32.model, q, qm, resp, rm, 0.7)
    diff = ((a.logp - b.logp).abs() * rm).max().item()
    assert diff < 2e-3, diff


@pytest.mark.parametrize("optimizer", ["plain", "fused"])
def test_non_finite_gradient_stops_before_the_update(lm_short, optimizer):
    """A NaN gradient (cuDNN attention's backward gave them on an H200) must not reach the adapter's weights.
    "fused": the CUDA trainer's fused AdamW (here its CPU kernel), which skips the step on the device instead of
    reading each norm back; the NaN comes in the second of four optimizer steps, and the finite ones after it are
    skipped too, so the adapter and AdamW's state stay as the first step left them."""
    from safetensors.torch import load
    tr = small_trainer(lm_short, ppo_epochs=2)
    if optimizer == "fused":
        tr.optimizer = torch.optim.AdamW(tr._params, lr=tr.config.lr, eps=tr.config.adam_eps,
                                         weight_decay=tr.config.weight_decay, fused=True)
    tr.step()
    n_steps = int(tr.optimizer.state[tr._params[0]]["step"])
    assert n_steps == 4                    # 2 epochs x 2 mini-batches
    before = load(tr.adapter_bytes())     # tensors, not bytes: safetensors writes its metadata in any order
    calls = []

    def nan_in_the_second_step(g):        # each micro-batch's backward calls it once; the later ones are finite
        calls.append(1)
        return torch.full_like(g, float("nan")) if len(calls) == 2 else g
    handle = tr._params[0].register_hook(nan_in_the_second_step)
    try:
        with pytest.raises(FloatingPointError, match="gradient norm is nan.*not applied"):
            tr.step()
    finally:
        handle.remove()
    after = load(tr.adapter_bytes())
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    steps = int(tr.optimizer.state[tr._params[0]]["step"])
    assert steps == n_steps + 1            # the first step of this update ran, no other
    assert changed                         # (that one moved the adapter)
    for p in tr._params:
        assert all(torch.isfinite(v).all() for v in tr.optimizer.state[p].values())
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not hasattr(tr.optimizer, "found_inf")


def test_cudnn_attention_is_turned_off_only_for_cuda_training():
    from rlhf_studio.components.attention import avoid_cudnn_attention
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert avoid_cudnn_attention("cpu") is False and torch.backends.cuda.cudnn_sdp_enabled()
        assert avoid_cudnn_attention(torch.device("cuda", 0)) is True
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert avoid_cudnn_attention("cuda") is False           # already off
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_compiled_training_passes_match_eager(lm_short):
    """compile="on": the training passes run through torch.compile'd decoder layers (counted by a recording
    backend that runs the captured graphs): one graph for all layers, no new one for the second step's
    micro-batch lengths (dynamic shapes), and the same update as the eager passes; the model's own layers are
    back afterwards. The update is compared after one step: the compiled graph's shared q/k/v x A^T matmul rounds
    differently in the last bits, Adam turns that into full steps on near-zero gradients, and a later sample
    can then differ."""
    import torch._dynamo
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward      # run the captured graph as it is (inductor's kernels are the GPU bench's part)

    backend = "studio_test_recording"
    torch._dynamo.register_backend(recording_backend, name=backend)
    eager = small_trainer(lm_short, ppo_epochs=1)
    want = eager.step()
    want_adapter = {k: v.clone() for k, v in eager._adapter_state().items()}
    compiled = small_trainer(lm_short, ppo_epochs=1, compile="on", compile_backend=backend)
    assert compiled.compiled
    # off CUDA the packed rows' attention reads row starts to the host, which a graph cannot: padded rows
    assert eager.pack_rows and not compiled.pack_rows
    init = {k: v.clone() for k, v in compiled._adapter_state().items()}
    got = compiled.step()
    got_adapter = {k: v.clone() for k, v in compiled._adapter_state().items()}
    n_graphs_after_first_step = len(graphs)
    second = compiled.step()
    assert all(math.isfinite(second[k]) for k in ("policy_loss", "value_loss", "approx_kl", "kl"))
    assert graphs, "the training passes did not go through torch.compile"
    assert len(graphs) == n_graphs_after_first_step, "new micro-batch lengths recompiled"
    # two graphs: one serves every layer, the first too (its input is made to need a gradient like the others');
    # the other turns the head's logits into log-probs
    assert n_graphs_after_first_step == 2, n_graphs_after_first_step
    linears = [sum(n.op == "call_function" and n.target is torch._C._nn.linear for n in g.graph.nodes)
               for g in graphs]
    assert sorted(linears) == [0, 7], linears          # q/k/v/o, gate/up/down; the log-probs graph has none
    assert any(n.target is torch.logsumexp for g in graphs for n in g.graph.nodes)
    assert [s["response"] for s in got["samples"]] == [s["response"] for s in want["samples"]]
    for k in ("policy_loss", "value_loss", "approx_kl", "kl", "reward_mean"):
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-5), k
    from rlhf_studio.components.training.engine.acceleration import decoder_layer_list
    layers = decoder_layer_list(lm_short.model.get_base_model().get_decoder())
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in layers)
    # Adam moves near-zero gradients by a full lr step, so compare each tensor's update as a whole
    for k, v in want_adapter.items():
        want_update, got_update = v - init[k], got_adapter[k] - init[k]
        assert torch.linalg.vector_norm(got_update - want_update) <= 0.01 * torch.linalg.vector_norm(want_update), k


def test_packed_rows_train_as_padded_rows(lm_short):
    """PPOConfig.pack_rows: the policy and training passes run the rows packed without padding (no shared prefix
    here; the reference pass keeps the padded layout, as this reward reads its hidden states). Two steps give the
    padded trainer's samples, losses, KL and adapter update; packed attention really ran, in both kinds of pass."""
    import rlhf_studio.components.attention as attention
    calls = []
    real = attention.packed_attention_forward

    def counting(module, query, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(module, query, *args, **kwargs)
    kw = dict(ppo_epochs=1, share_prompt_prefix=False, old_logprobs="forward", tree_rows=False)   # not the CPU tree
    padded = small_trainer(lm_short, pack_rows=False, **kw)
    want = [padded.step() for _ in range(2)]
    want_adapter = {k: v.clone() for k, v in padded._adapter_state().items()}
    packed = small_trainer(lm_short, **kw)
    assert packed.pack_rows and not padded.pack_rows
    init = packed._adapter_state()
    from transformers import AttentionInterface

    import rlhf_studio.components.training.engine.rollout as rollout
    real_packed, packed_with_host_lengths = rollout._packed, []

    def spy_packed(*args):
        if torch.is_grad_enabled():
            packed_with_host_lengths.append(len(args) > 3 and args[3] is not None)
        return real_packed(*args)
    attention.register_packed_attention()            # now, so that the first pass does not register over the spy
    AttentionInterface.register(attention.PACKED, counting)
    rollout._packed = spy_packed
    try:
        got = [packed.step() for _ in range(2)]
    finally:
        AttentionInterface.register(attention.PACKED, real)
        rollout._packed = real_packed
    n_layers = lm_short.model.config.num_hidden_layers
    # per step: the policy pass (no gradient), then 2 training micro-batches of 2 rows
    assert calls.count(False) == 2 * n_layers and calls.count(True) == 2 * 2 * n_layers, len(calls)
    # the update's micro-batches pass their prompt lengths from the host: packing reads nothing back there
    assert packed_with_host_lengths == [True] * 2 * 2, packed_with_host_lengths
    assert lm_short.model.config._attn_implementation == "sdpa"
    for g, w in zip(got, want):
        assert [s["response"] for s in g["samples"]] == [s["response"] for s in w["samples"]]
        for k in ("policy_loss", "value_loss", "approx_kl", "kl", "reward_mean"):
            assert g[k] == pytest.approx(w[k], rel=1e-3, abs=1e-5), k
    got_adapter = packed._adapter_state()
    for k, v in want_adapter.items():
        want_update, got_update = v - init[k], got_adapter[k] - init[k]
        assert torch.linalg.vector_norm(got_update - want_update) <= 0.05 * torch.linalg.vector_norm(want_update), k


_EAGER_FIRST_STEP = {}


def eager_first_step(lm):
    """small_trainer(ppo_epochs=1)'s initial adapter, first step's metrics and adapter update, eager (computed
    once: every fallback case compares with it)."""
    if id(lm) not in _EAGER_FIRST_STEP:
        eager = small_trainer(lm, ppo_epochs=1)
        init = {k: v.clone() for k, v in eager._adapter_state().items()}
        want = eager.step()
        _EAGER_FIRST_STEP[id(lm)] = init, want, {k: v - init[k] for k, v in eager._adapter_state().items()}
    return _EAGER_FIRST_STEP[id(lm)]


@pytest.mark.parametrize("failure", ["compiler", "detach", "zero"])
def test_compiled_passes_that_fail_fall_back_to_eager_training(lm_short, failure):
    """Where the compiled passes fail, the run trains eagerly instead of failing, and says why.
    compiler: the backend cannot compile (as inductor without a working C++ compiler or Triton).
    detach / zero: an H100 run once compiled layers whose graph skipped attention's backward pass (the q/k/v
    adapters got no gradient, silently); stood in for by cutting attention's output from the compiled graphs only
    (no gradient at all) or zeroing it (zero gradients). Either way the first update is redone eagerly before its
    step: it equals an eager run's, and later steps do not try to compile again."""
    import torch._dynamo
    from rlhf_studio.components.training.engine.acceleration import decoder_layer_list
    from torch._dynamo.backends.registry import list_backends
    calls = []
    def plain(gm, example_inputs):
        calls.append(1)
        return gm.forward
    def no_compiler(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    name = f"studio_test_fallback_{failure}"
    if name not in list_backends(exclude_tags=()):
        torch._dynamo.register_backend(no_compiler if failure == "compiler" else plain, name=name)
    init, want, want_update = eager_first_step(lm_short)

    trainer = small_trainer(lm_short, ppo_epochs=1, compile="on", compile_backend=name)
    assert trainer.compiled and trainer.compile_fallback is None
    layers = decoder_layer_list(lm_short.model.get_base_model().get_decoder())
    def cut_attention_when_compiled(module, args):
        if torch.compiler.is_compiling():
            return (args[0].detach(),) if failure == "detach" else (args[0] * 0,)
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(cut_attention_when_compiled) for layer in layers]
    try:
        got = trainer.step()
        after_first = {k: v.clone() for k, v in trainer._adapter_state().items()}
        n_calls = len(calls)
        again = trainer.step()
    finally:
        for h in hooks:
            h.remove()
        torch._dynamo.reset()
    assert n_calls >= 1 and len(calls) == n_calls          # it compiled (or tried) once, then not again
    assert not trainer.compiled and got["compiled"] == 0.0 and again["compiled"] == 0.0
    why = r"No working C\+\+ compiler" if failure == "compiler" else \
        r"no gradient to \d+ trainable tensors \(first: .*q_proj"
    assert re.search(why, trainer.compile_fallback), trainer.compile_fallback
    assert [s["response"] for s in got["samples"]] == [s["response"] for s in want["samples"]]
    for k in ("policy_loss", "value_loss", "approx_kl", "kl", "reward_mean"):
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-5), k
    # the first update as the eager run's: applied once, with every tensor's gradient (a step on the cut graph's
    # gradients would leave q_proj where it was; a step taken twice would move it twice as far)
    got_update = {k: v - init[k] for k, v in after_first.items()}
    for k, w in want_update.items():
        assert torch.linalg.vector_norm(got_update[k] - w) <= 0.05 * torch.linalg.vector_norm(w), k
    assert math.isfinite(again["policy_loss"])


def test_a_seed_gives_the_same_run_on_a_fresh_or_a_reused_model(lm_short):
    """A fresh peft wrap and a re-attached adapter once drew different LoRA inits (and left the sampling RNG
    elsewhere): the second run of the same config in one process differed from the first."""
    from rlhf_studio.components.models import load_model
    fresh = keep_first_layers(load_model("embedded", dtype="fp32"), SHORT_LAYERS)
    first = small_trainer(fresh)                   # wraps the model in a PeftModel
    a = first.step()
    again = small_trainer(fresh)                   # re-initialises the existing adapter
    b = again.step()
    assert [s["response"] for s in a["samples"]] == [s["response"] for s in b["samples"]]
    assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-5)
    sa, sb = first._adapter_state(), again._adapter_state()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_failed_cuda_graph_capture_is_in_the_notes(lm32, monkeypatch):
    """The fast sampler then decodes eagerly (tests/test_fastgen.py); the run's notes say so, and why."""
    import rlhf_studio.components.training.engine.passes as trainer_module
    tr = small_trainer(lm32, steps=1)
    assert tr.notes == []
    monkeypatch.setattr(trainer_module, "graph_capture_failure",
                        lambda model: "RuntimeError: capture broke" if model is tr.model else None)
    assert tr.notes == ["rollouts decode without CUDA graphs, slower: capturing one failed (RuntimeError: capture "
                        "broke)"]


def test_a_model_the_fast_sampler_refuses_trains_sampling_with_generate(lm32, tmp_path, monkeypatch):
    """A local model folder with sliding-window attention shorter than the sequence (a Mistral-style decoder,
    random weights, the embedded tokenizer): the fast sampler refuses it. PPO then samples with `model.generate`,
    exactly as with the fast sampler switched off, and says so in its notes; it once failed its first step."""
    from transformers import MistralConfig, MistralForCausalLM
    from rlhf_studio.components.models import load_model
    folder = tmp_path / "tiny-mistral-sliding"
    tok = lm32.tokenizer
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)

    def run(fast: bool):
        monkeypatch.setenv("RLHF_STUDIO_FASTGEN", "1" if fast else "0")
        trainer = small_trainer(load_model(str(folder), dtype="fp32"), steps=2)
        return trainer, [trainer.step() for _ in range(2)]

    refused, got = run(fast=True)
    sampler = [n for n in refused.notes if "model.generate" in n]
    assert len(sampler) == 1 and "sliding-window attention (16)" in sampler[0], refused.notes
    window = [n for n in refused.notes if n not in sampler]     # packed rows, shared prefix: the window's too
    assert all("sliding window" in n for n in window), window
    plain, want = run(fast=False)
    assert plain.notes == window           # the sampler switched off by the user: nothing more to say
    for g, w in zip(got, want):
        assert [s["response"] for s in g["samples"]] == [s["response"] for s in w["samples"]]
        for k in ("policy_loss", "value_loss", "kl", "reward_mean"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
