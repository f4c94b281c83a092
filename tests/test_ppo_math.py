"""PPO maths against hand-computed numbers (no model). Expected values are written out, worked by hand."""
import dataclasses
import math

import pytest
import torch

from rlhf_studio.components.training import ppo
from rlhf_studio.components.training.engine import ops
from rlhf_studio.components.training.ppo_config import PPOConfig


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# log-probs and entropy
# ---------------------------------------------------------------------------------------------------------

def test_logprobs_divide_by_temperature():
    logits = t([[[0.0, math.log(3.0)]]])        # [1, 1, 2]
    labels = torch.tensor([[1]])
    # T=1: softmax = (1/4, 3/4) -> log(3/4)
    assert ops.logprobs_from_logits(logits, labels, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    # T=0.5: logits/T = (0, 2 log 3) -> softmax = (1/10, 9/10)
    assert ops.logprobs_from_logits(logits, labels, 0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)
    # T=2: logits/T = (0, log sqrt 3) -> p = sqrt3 / (1 + sqrt3)
    s3 = math.sqrt(3.0)
    assert ops.logprobs_from_logits(logits, labels, 2.0).item() == pytest.approx(math.log(s3 / (1 + s3)), abs=1e-6)


def test_compiled_logprobs_equal_eager_on_bf16_logits():
    """The compiled PPO update turns the head's bf16 logits into log-probs through torch.compile (inductor, here
    its CPU code): same values and the same bf16 gradient as the eager function, from the hand-checked one above."""
    import torch._dynamo
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 1000, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    compiled = torch.compile(ops.logprobs_from_logits, dynamic=True)
    try:
        for temperature in (1.0, 0.7):
            got_in, want_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            got = compiled(got_in, labels, temperature)
            want = ops.logprobs_from_logits(want_in, labels, temperature)
            assert got.dtype == want.dtype == torch.float32
            assert torch.allclose(got, want, atol=1e-4)
            (got * weights).sum().backward()
            (want * weights).sum().backward()
            assert got_in.grad.dtype == torch.bfloat16
            assert torch.allclose(got_in.grad.float(), want_in.grad.float(), atol=1e-2, rtol=1e-2)
    finally:
        torch._dynamo.reset()


def test_entropy_from_logits():
    # uniform over 4 -> log 4; (1/4, 3/4) -> -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351446
    logits = t([[[0.0, 0.0, 0.0, 0.0]], [[0.0, math.log(3.0), -1e4, -1e4]]]).reshape(2, 1, 4)
    h = ops.entropy_from_logits(logits)
    assert h[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert h[1, 0].item() == pytest.approx(0.5623351446, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------------------

def test_masked_mean_var_whiten():
    x = t([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    m = t([[1, 1, 0], [1, 1, 0]])
    # kept: 1, 2, 3, 6 -> mean 3; squared deviations 4, 1, 0, 9 = 14; unbiased var = 14 / 3
    assert ops.masked_mean(x, m).item() == pytest.approx(3.0)
    assert ops.masked_var(x, m).item() == pytest.approx(14.0 / 3.0, rel=1e-6)
    assert ops.masked_var(x, m, unbiased=False).item() == pytest.approx(3.5, rel=1e-6)
    w = ops.masked_whiten(x, m)
    sd = math.sqrt(14.0 / 3.0)
    expected = [(1 - 3) / sd, (2 - 3) / sd, (3 - 3) / sd, (6 - 3) / sd]
    got = [w[0, 0].item(), w[0, 1].item(), w[1, 0].item(), w[1, 1].item()]
    assert got == pytest.approx(expected, rel=1e-5)
    # shift_mean=False: scaled, mean kept: 3 + (x - 3) / sd
    w2 = ops.masked_whiten(x, m, shift_mean=False)
    assert w2[1, 1].item() == pytest.approx(3 + 3 / sd, rel=1e-5)
    # per-row mean along a dim
    assert ops.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 4.5])


# ---------------------------------------------------------------------------------------------------------
# rewards with the per-token KL penalty
# ---------------------------------------------------------------------------------------------------------

def test_kl_penalized_rewards():
    scores = t([2.0, -1.0])
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-0.1, -0.2, -1.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])          # row 2 ends after 2 tokens (EOS at index 1)
    rewards, kl = ppo.kl_penalized_rewards(scores, logp, ref, mask, beta=0.1)
    # kl row1: 0.5, -1.0, 0.0 ; row2: -0.2, -0.5, (masked) 0
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0], abs=1e-6)
    assert kl.tolist()[1] == pytest.approx([-0.2, -0.5, 0.0], abs=1e-6)
    # rewards = -0.1 * kl, + score at the last real token
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.1, 0.0 + 2.0], abs=1e-6)
    assert rewards.tolist()[1] == pytest.approx([0.02, 0.05 - 1.0, 0.0], abs=1e-6)


def test_last_token_index():
    m = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert ppo.last_token_index(m).tolist() == [2, 0, 3]


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------

def test_gae_by_hand():
    # one sequence of 3 tokens, gamma = 0.9, lam = 0.8
    r = t([[0.1, -0.2, 1.0]])
    v = t([[0.5, 0.4, 0.3]])
    m = t([[1, 1, 1]])
    adv, ret = ppo.gae(r, v, m, gamma=0.9, lam=0.8)
    # delta2 = 1.0 + 0.9*0 - 0.3 = 0.7                          A2 = 0.7
    # delta1 = -0.2 + 0.9*0.3 - 0.4 = -0.33                     A1 = -0.33 + 0.72*0.7 = 0.174
    # delta0 = 0.1 + 0.9*0.4 - 0.5 = -0.04                      A0 = -0.04 + 0.72*0.174 = 0.08528
    assert adv.tolist()[0] == pytest.approx([0.08528, 0.174, 0.7], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.58528, 0.574, 1.0], abs=1e-6)


def test_gae_masked_tail_and_gamma_one():
    # second row ends after 2 tokens: the value/reward at the padded position must not leak back
    r = t([[0.0, 0.0, 1.0], [0.0, 2.0, 55.0]])
    v = t([[0.2, 0.4, 0.6], [0.5, 1.0, 77.0]])
    m = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = ppo.gae(r, v, m, gamma=1.0, lam=0.5)
    # row 1: d2 = 1 - 0.6 = 0.4 ; d1 = 0 + 0.6 - 0.4 = 0.2 ; d0 = 0 + 0.4 - 0.2 = 0.2
    #        A2 = 0.4 ; A1 = 0.2 + 0.5*0.4 = 0.4 ; A0 = 0.2 + 0.5*0.4 = 0.4
    # row 2: d1 = 2 + 0 - 1 = 1 ; d0 = 0 + 1 - 0.5 = 0.5 ; A1 = 1 ; A0 = 0.5 + 0.5*1 = 1.0 ; A2 masked = 0
    assert adv.tolist()[0] == pytest.approx([0.4, 0.4, 0.4], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)
    assert ret.tolist()[1] == pytest.approx([1.5, 2.0, 0.0], abs=1e-6)


def test_gae_matches_plain_loop_random():
    torch.manual_seed(0)
    B, T, gamma, lam = 3, 6, 0.97, 0.9
    r, v = torch.randn(B, T), torch.randn(B, T)
    lengths = [6, 4, 1]
    m = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    adv, _ = ppo.gae(r, v, m, gamma, lam)
    for i, n in enumerate(lengths):   # plain-Python loop over the real tokens of each row
        a, expected = 0.0, [0.0] * T
        for k in reversed(range(n)):
            nv = float(v[i, k + 1]) if k + 1 < n else 0.0
            a = float(r[i, k]) + gamma * nv - float(v[i, k]) + gamma * lam * a
            expected[k] = a
        assert adv[i].tolist() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# clipped losses
# ---------------------------------------------------------------------------------------------------------

def test_policy_loss_clipping_by_hand():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    new = t([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.7)]])   # ratios 1.5, 0.5, 1.1, 0.7
    adv = t([[1.0, 1.0, -2.0, -1.0]])
    mask = t([[1, 1, 1, 1]])
    loss, clip_frac, approx_kl = ppo.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 1: A=+1, r=1.5: max(-1.5, -1.2) = -1.2   (clipped)
    # token 2: A=+1, r=0.5: max(-0.5, -0.8) = -0.5   (not clipped: pessimistic unclipped term)
    # token 3: A=-2, r=1.1: max( 2.2,  2.2) =  2.2   (inside the range)
    # token 4: A=-1, r=0.7: max( 0.7,  0.8) =  0.8   (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 4)
    l = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.7)]
    assert approx_kl.item() == pytest.approx(sum(0.5 * x * x for x in l) / 4, rel=1e-5)


def test_policy_loss_mask_and_gradient():
    old = t([[0.0, 0.0]])
    new = t([[math.log(1.5), 5.0]]).requires_grad_(True)
    adv = t([[-1.0, 100.0]])
    mask = t([[1, 0]])
    loss, clip_frac, _ = ppo.policy_loss(new, old, adv, mask, 0.2)
    # only token 1: A=-1, r=1.5 -> max(1.5, 1.2) = 1.5, unclipped -> gradient = -A * r = 1.5
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    assert clip_frac.item() == 0.0
    loss.backward()
    assert new.grad.tolist()[0] == pytest.approx([1.5, 0.0], abs=1e-6)


def test_policy_loss_stays_finite_when_the_ratio_overflows():
    # A policy that moved far (a high learning rate over several epochs) gives log-ratios past float32's exp range.
    old = t([[0.0, 0.0, 0.0]])
    new = t([[100.0, 0.0, 200.0]]).requires_grad_(True)
    adv = t([[-1.0, 1.0, 0.0]])
    mask = t([[1, 1, 0]])                      # token 3 is masked but overflows too: inf * 0 would be nan
    loss, clip_frac, approx_kl = ppo.policy_loss(new, old, adv, mask, 0.2)
    # token 1: A=-1, ratio held at e^20 -> max(e^20, 1.2) = e^20, no gradient; token 2: A=+1, r=1 -> -1
    assert loss.item() == pytest.approx((math.exp(ppo.LOG_RATIO_MAX) - 1.0) / 2, rel=1e-5)
    loss.backward()
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0], abs=1e-6)
    assert math.isfinite(approx_kl.item()) and clip_frac.item() == 0.0


def test_value_loss_clipping_by_hand():
    old = t([[1.0, 1.0, 1.0]])
    new = t([[1.5, 0.9, 2.0]])
    ret = t([[2.0, 0.0, 1.0]])
    mask = t([[1, 1, 1]])
    loss, clip_frac = ppo.value_loss(new, old, ret, mask, cliprange_value=0.2)
    # token 1: v_clip = 1.2 ; (1.5-2)^2 = 0.25 ; (1.2-2)^2 = 0.64 -> 0.64 (clip active)
    # token 2: v_clip = 0.9 ; both 0.81 -> 0.81 (not counted as clipped)
    # token 3: v_clip = 1.2 ; (2-1)^2 = 1.0 ; (1.2-1)^2 = 0.04 -> 1.0
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------------
# KL controllers and config
# ---------------------------------------------------------------------------------------------------------

def test_kl_controllers():
    c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(9.0, n_steps=10)         # e = clip(9/6 - 1) = 0.5 -> 0.2 ; beta *= 1 + 0.2*10/100 = 1.02
    assert c.value == pytest.approx(0.102)
    c.update(3.0, n_steps=10)         # e = -0.5 -> -0.2 ; beta *= 0.98
    assert c.value == pytest.approx(0.102 * 0.98)
    c.update(6.6, n_steps=50)         # e = 0.1 ; beta *= 1.05
    assert c.value == pytest.approx(0.102 * 0.98 * 1.05)
    f = ppo.FixedKLController(0.05)
    f.update(100.0, 8)
    assert f.value == 0.05
    c2 = ppo.AdaptiveKLController(1.0, 1.0, 1)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value and c2.target == 6.0 and c2.horizon == 100


def test_config_roundtrip_and_validation():
    import json
    c = PPOConfig(steps=3, batch_size=4, mini_batch_size=2, grad_accum=2, target_modules=["q_proj", "v_proj"])
    d = json.loads(json.dumps(c.to_dict()))
    assert PPOConfig.from_dict(d) == c
    with pytest.raises(ValueError):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError):
        PPOConfig.from_dict({"stepz": 3})
    # a run stored before a field was retired still loads (and resumes) without it
    assert PPOConfig.from_dict({**d, "stack_sibling_bases": True}) == c
    with pytest.raises(ValueError):
        PPOConfig(value_head_init="random")


# ---------------------------------------------------------------------------------------------------------
# rollout helpers (pure tensor functions)
# ---------------------------------------------------------------------------------------------------------

def test_mask_after_eos_and_left_pad():
    from rlhf_studio.components.training.engine.rollout import left_pad, mask_after_eos, position_ids_from_mask
    eos = 2
    resp = torch.tensor([[5, 6, 2, 0, 0],      # EOS at 2: keep 3 tokens
                         [2, 7, 2, 9, 9],      # EOS first: keep 1 token, later EOS ignored
                         [5, 6, 7, 8, 9]])     # no EOS: keep all, has_eos False
    mask, has_eos = mask_after_eos(resp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]
    ids, m = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert m.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(m).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_encode_prompts_left_truncates():
    from rlhf_studio.components.training.engine.rollout import encode_prompts

    class FakeLM:
        def prompt_ids(self, p):
            return list(range(len(p)))
    out = encode_prompts(FakeLM(), ["abcdef", [9, 8, 7]], max_prompt_tokens=4)
    assert out == [[2, 3, 4, 5], [9, 8, 7]]


# ---------------------------------------------------------------------------------------------------------
# memory estimate
# ---------------------------------------------------------------------------------------------------------

def test_estimate_memory_orders_sensibly():
    from rlhf_studio.components.training.memory import estimate_memory
    small = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
    big = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
               num_key_value_heads=32, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
    cfg = PPOConfig(batch_size=16, mini_batch_size=16, max_new_tokens=64, max_prompt_tokens=128)
    e = estimate_memory(small, cfg, None, "bf16")
    # SmolLM2-135M: 134.5M parameters; LoRA r=16 on all 7 linears of 30 layers = 4,884,480
    assert e["params"] == pytest.approx(134_515_008, rel=1e-6)
    assert e["trainable_params"] == 4_884_480 + 577
    assert e["breakdown"]["weights"] == pytest.approx(134_515_008 * 2, rel=1e-6)
    b16 = estimate_memory(big, cfg, None, "bf16")["bytes"]
    # a quantized base takes peft's LoRA forward (its fp32 copies of the LoRA inputs); compare like with like
    peft = dataclasses.replace(cfg, fused_lora=False)
    b16_peft = estimate_memory(big, peft, None, "bf16")["bytes"]
    b8 = estimate_memory(big, cfg, "8bit", "bf16")["bytes"]
    b4 = estimate_memory(big, cfg, "4bit", "bf16")["bytes"]
    assert b4 < b8 < b16_peft and b16 < b16_peft and e["bytes"] < b16
    ckpt = PPOConfig(batch_size=16, mini_batch_size=16, max_new_tokens=64, max_prompt_tokens=128,
                     gradient_checkpointing=True)
    assert estimate_memory(big, ckpt, None, "bf16")["breakdown"]["training"] < \
        estimate_memory(big, cfg, None, "bf16")["breakdown"]["training"]
    assert estimate_memory(small, cfg, None, "fp32")["bytes"] > e["bytes"]


# Peaks (torch.cuda.max_memory_allocated, GiB) that bench/gpu_ppo.py measured on 2026-11-26 (the script is now
# bench/bench_ppo.py --device cuda): (shape, quant, batch,
# mini-batch, new tokens, LoRA forward, compile, peak). H200: batch 16 x 32 new tokens; H100: batch 64 x 128 new
# tokens. Prompts <= 64. "peft": measured before the fused forward took fp32 adapters on a bf16 base (peft's
# forward ran); "fp32" and "half": the fused forward with that lora_precision.
MEASURED_CUDA_PEAKS = [
    ("135m", None, 16, 16, 32, "peft", "off", 2.55), ("135m", "8bit", 16, 16, 32, "peft", "off", 2.68),
    ("135m", "4bit", 16, 16, 32, "peft", "off", 2.41), ("0.5b", None, 16, 16, 32, "peft", "off", 5.35),
    ("0.5b", "8bit", 16, 16, 32, "peft", "off", 5.48), ("0.5b", "4bit", 16, 16, 32, "peft", "off", 4.84),
    ("1.7b", None, 16, 16, 32, "peft", "off", 9.98), ("1.7b", "8bit", 16, 16, 32, "peft", "off", 9.36),
    ("1.7b", "4bit", 16, 16, 32, "peft", "off", 7.76), ("135m", None, 64, 64, 128, "peft", "off", 20.28),
    ("1.7b", None, 64, 32, 128, "peft", "off", 31.42),
    ("1.7b", None, 64, 32, 128, "fp32", "off", 23.54), ("1.7b", None, 64, 32, 128, "fp32", "on", 24.69),
    ("1.7b", None, 64, 32, 128, "half", "off", 23.51), ("1.7b", None, 64, 32, 128, "half", "on", 20.19),
    ("135m", None, 64, 64, 128, "half", "off", 15.16), ("1.7b", None, 64, 64, 128, "half", "off", 41.27),
    ("1.7b", None, 64, 64, 128, "half", "on", 34.58),
]
CUDA_SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape,quant,batch,mini,new_tokens,lora,compile,peak_gib", MEASURED_CUDA_PEAKS)
def test_estimate_is_not_below_a_measured_gpu_peak(shape, quant, batch, mini, new_tokens, lora, compile, peak_gib):
    """The estimate errs high (the UI refuses runs by it): at least every peak measured on a GPU, within 1.6x.
    At batch 64 it was 22% under before it counted the fp32 copies of the LoRA inputs that peft saves."""
    from rlhf_studio.components.training.memory import estimate_memory
    cfg = PPOConfig(batch_size=batch, mini_batch_size=mini, max_new_tokens=new_tokens, max_prompt_tokens=64,
                    lora_r=16, lora_alpha=32, fused_lora=lora != "peft",
                    lora_precision="fp32" if lora == "peft" else lora, compile=compile)
    est = estimate_memory(CUDA_SHAPES[shape], cfg, quant, "bf16", device="cuda")["gib"]
    assert peak_gib <= est <= 1.6 * peak_gib
