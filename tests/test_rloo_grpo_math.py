"""RLOO and GRPO advantages and losses on hand-computed tensors, then one real step of each on a cut model."""
import math

import pytest
import torch

from rlhf_studio.components.training.grpo import GRPOConfig, grpo_advantages, grpo_loss
from rlhf_studio.components.training.rloo import RLOOConfig, rloo_advantages, rloo_loss

T = torch.tensor


def _close(a, b):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), T(b, dtype=torch.float32), atol=1e-5), (a, b)


def test_rloo_leave_one_out_advantages_by_hand():
    # group [1, 2, 3]: baselines 2.5, 2, 1.5; group [0, 0, 6]: baselines 3, 3, 0
    _close(rloo_advantages(T([1., 2., 3., 0., 0., 6.]), k=3), [-1.5, 0., 1.5, -3., -3., 6.])
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(T([1., 2., 3.]), k=4)


def test_rloo_loss_by_hand():
    # row 0: log-ratio 0.25 + 0.25 = 0.5 -> ratio e^0.5, clipped to 1.2, A = 1 -> max(-1.6487, -1.2) = -1.2
    # row 1: log-ratio -0.1 -> ratio 0.9048 (inside the clip), A = -2 -> 1.8097; the masked token is ignored
    logp = T([[-1.0, -1.0], [-1.1, 7.0]])
    old = T([[-1.25, -1.25], [-1.0, -1.0]])
    mask = T([[1., 1.], [1., 0.]])
    loss, clip_frac = rloo_loss(logp, old, T([1., -2.]), mask, cliprange=0.2)
    _close(loss, (-1.2 + 2 * math.exp(-0.1)) / 2)
    _close(clip_frac, 0.5)
    # on-policy (ratio 1) the gradient is REINFORCE's: d loss / d logp_t = -A_i / N on each real token
    lp = old.clone().requires_grad_()
    rloo_loss(lp, old, T([1., -2.]), mask, cliprange=0.2)[0].backward()
    _close(lp.grad, [[-0.5, -0.5], [1.0, 0.0]])


def test_grpo_group_normalised_advantages_by_hand():
    # [1, 2, 3]: mean 2, unbiased std 1; an all-equal group teaches nothing
    _close(grpo_advantages(T([1., 2., 3., 5., 5., 5.]), k=3), [-1 / 1.0001, 0., 1 / 1.0001, 0., 0., 0.])
    _close(grpo_advantages(T([1., 3., 0., 4.]), k=2, scale=False), [-1., 1., -2., 2.])


def test_grpo_loss_by_hand():
    # row 0: ratios [1.5, 1], A = 1: min(1.5, 1.2) and 1 -> mean 1.1 -> -1.1 (one of two tokens clipped)
    # row 1: ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> 0.8 (clipped); its second token is masked
    logp = T([[math.log(1.5), 0.0], [math.log(0.5), 3.0]])
    old = T([[0.0, 0.0], [0.0, 0.0]])
    mask = T([[1., 1.], [1., 0.]])
    loss, clip_frac, kl = grpo_loss(logp, old, logp, T([1., -1.]), mask, cliprange=0.2, beta=0.1)
    _close(loss, (-1.1 + 0.8) / 2)
    _close(clip_frac, 2 / 3)
    _close(kl, 0.0)                           # reference == policy
    # the KL term: one token with log pi_ref - log pi = 0.5 -> e^0.5 - 0.5 - 1, times beta, added to the loss
    lp, ref = T([[0.0, 0.0]]), T([[0.5, 0.0]])
    loss, _, kl = grpo_loss(lp, lp, ref, T([2.]), T([[1., 1.]]), cliprange=0.2, beta=0.1)
    k3 = math.exp(0.5) - 1.5
    _close(loss, (-(2 - 0.1 * k3) - 2) / 2)
    _close(kl, k3 / 2)


def test_configs_refuse_bad_groups():
    with pytest.raises(ValueError, match="k must be >= 2"):
        RLOOConfig(k=1)
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        GRPOConfig(prompts_per_step=3, k=2, mini_batch_size=4)
    c = GRPOConfig(prompts_per_step=2, k=3, mini_batch_size=6, epochs=2)
    assert (c.samples_per_step(), c.epochs_per_step()) == (6, 2)          # what the online engine reads
    e = c.engine_config()                                                  # what the memory estimate reads
    assert (e.batch_size, e.ppo_epochs, e.vf_coef, e.kl_coef) == (6, 2, 0.0, 0.04)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_configs_stored_before_the_engine_had_its_own_config_still_read(algorithm):
    """The online engine reads RLOO's and GRPO's own configs now; their checkpoints still hold the PPOConfig
    form that runs stored before hold (tests/fixtures/stored_runs/, written by older code), and a run's config
    stored without the engine settings OnlineConfig took over from PPOConfig reads with their defaults."""
    import json
    from rlhf_studio.components.model_utils import safetensors_metadata
    from rlhf_studio.components.training import config_class
    from tests.stored_runs import FIXTURES, SETTINGS
    meta = json.loads(safetensors_metadata((FIXTURES / f"{algorithm}.safetensors").read_bytes())["ppo_state"])
    cfg = config_class(algorithm)(**SETTINGS[algorithm])
    added_since = ("tree_rows",)                  # settings new since the fixtures were written (defaults)
    assert {k: v for k, v in cfg.engine_config().to_dict().items() if k not in added_since} == meta["config"]
    moved = ("old_logprobs", "merge_for_generation", "adam_eps", "lora_precision", "compile_backend")
    before = {k: v for k, v in cfg.to_dict().items()
              if (algorithm == "ppo" or k not in moved) and k not in added_since}
    assert type(cfg).from_dict(json.loads(json.dumps(before))) == cfg


@pytest.fixture(scope="module")
def cut_lm():
    from rlhf_studio.components.models import load_model
    from tests.layers import keep_first_layers
    return keep_first_layers(load_model("embedded"), 2)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_one_step_trains_the_adapter_only_and_resumes(cut_lm, algorithm):
    import json
    from rlhf_studio.components.model_utils import safetensors_metadata
    from rlhf_studio.components.training.rewards import TokenCountReward
    from rlhf_studio.components.training import build_trainer, config_class
    cfg = config_class(algorithm)(steps=2, prompts_per_step=2, k=2, mini_batch_size=4, max_new_tokens=4,
                                  lr=1e-3, lora_r=4, lora_alpha=8)
    reward = TokenCountReward(range(2000))      # frequent tokens: the k samples of a prompt score differently
    tr = build_trainer(cut_lm, algorithm, cfg, prompts=["Name a fruit.", "Say hello."], reward_fn=reward)
    before = [p.detach().clone() for p in tr._lora]
    blob = tr.state_bytes()
    stored = json.loads(safetensors_metadata(blob)["ppo_state"])["config"]
    assert stored == cfg.engine_config().to_dict()                          # the form stored runs hold
    m = tr.step()
    assert m["samples_per_s"] > 0 and math.isfinite(m["policy_loss"]) and m["advantage_std"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr._lora))      # the adapter moved
    assert float(tr.value_head.weight.detach().abs().sum()) == 0.0                     # no critic
    again = build_trainer(cut_lm, algorithm, cfg, prompts=["Name a fruit.", "Say hello."], reward_fn=reward)
    again.load_state_bytes(blob)
    assert again.step()["policy_loss"] == pytest.approx(m["policy_loss"], rel=1e-4, abs=1e-6)
