"""DPO / IPO / SimPO and KTO losses on hand-computed tensors, then a few real steps on a cut model: the
preference margin grows, and a checkpoint resumes to the same next step."""
import math

import pytest
import torch

from rlhf_studio.components.training.dpo import DPOConfig, dpo_loss
from rlhf_studio.components.training.kto import KTOConfig, kto_kl, kto_loss

T = torch.tensor


def _close(a, b):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), T(b, dtype=torch.float32), atol=1e-5), (a, b)


def test_dpo_sigmoid_loss_and_rewards_by_hand():
    # pair 0: chosen ratio 1, rejected ratio -1 -> beta*h = 0.5*2 = 1; pair 1: ratios -1, 1 -> beta*h = -1
    losses, rc, rr = dpo_loss(T([-1., -4.]), T([-3., -2.]), T([-2., -3.]), T([-2., -3.]), beta=0.5)
    _close(losses, [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))])
    _close(rc, [0.5, -0.5])
    _close(rr, [-0.5, 0.5])
    # conservative DPO: 0.9 * -log s(1) + 0.1 * -log s(-1)
    ls, _, _ = dpo_loss(T([-1.]), T([-3.]), T([-2.]), T([-2.]), beta=0.5, label_smoothing=0.1)
    _close(ls, [0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = T([-1.], requires_grad=True), T([-3.], requires_grad=True)
    dpo_loss(pc, pr, T([-2.]), T([-2.]), beta=0.5)[0].sum().backward()
    # d/dpc of -log s(b(pc - pr + c)) = -b * s(-z) with z = 1
    _close(pc.grad, [-0.5 / (1 + math.exp(1))])
    _close(pr.grad, [0.5 / (1 + math.exp(1))])


def test_ipo_and_simpo_by_hand():
    # ipo: h = 1/2 - (-1)/4 = 0.75; 1/(2 beta) = 1 -> (0.75 - 1)^2
    losses, _, _ = dpo_loss(T([-1.]), T([-3.]), T([-2.]), T([-2.]), beta=0.5, loss_type="ipo",
                            chosen_tokens=T([2.]), rejected_tokens=T([4.]))
    _close(losses, [0.0625])
    # simpo: means -0.5 and -0.75, beta 2 -> 2 * 0.25 - gamma 1 = -0.5; the reference is not read
    losses, rc, rr = dpo_loss(T([-1.]), T([-3.]), T([99.]), T([-99.]), beta=2.0, loss_type="simpo",
                              chosen_tokens=T([2.]), rejected_tokens=T([4.]), simpo_gamma=1.0)
    _close(losses, [math.log(1 + math.exp(0.5))])
    _close(rc, [-1.0])
    _close(rr, [-1.5])
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(T([-1.]), T([-3.]), T([-2.]), T([-2.]), beta=0.5, loss_type="ipo")


def test_kto_loss_and_reference_point_by_hand():
    # r = [1, -1]; row 0 desirable: 1 - s(1 * (1 - 0.5)); row 1 undesirable, weight 2: 2 * (1 - s(0.5 + 1))
    losses, rewards = kto_loss(T([-1., -2.]), T([-2., -1.]), T([True, False]), T(0.5), beta=1.0,
                               desirable_weight=1.0, undesirable_weight=2.0)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    _close(losses, [1 - s(0.5), 2 * (1 - s(1.5))])
    _close(rewards, [1.0, -1.0])
    _close(kto_kl(T([-1., -1.]), T([-2., -3.])), 1.5)      # mean of [1, 2]
    _close(kto_kl(T([-3.]), T([-1.])), 0.0)                # clamped at 0
    z = kto_kl(T([-1.], requires_grad=True), T([-2.]))
    assert not z.requires_grad                             # the reference point is not differentiated


def test_configs_refuse_bad_settings():
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        DPOConfig(batch_size=3, grad_accum=2)
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        KTOConfig(beta=0)
    with pytest.raises(ValueError, match="at most"):
        KTOConfig(batch_size=100000)
    with pytest.raises(ValueError, match="unknown DPOConfig keys: btea"):
        DPOConfig.from_dict({"btea": 0.1})
    assert DPOConfig.from_dict(DPOConfig(beta=0.2).to_dict()) == DPOConfig(beta=0.2)


PAIRS = [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "I do not know any fruit at all, sorry."},
         {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No. I will not say that word to you."}]


@pytest.fixture(scope="module")
def cut_lm():
    from rlhf_studio.components.models import load_model
    from tests.layers import keep_first_layers
    return keep_first_layers(load_model("embedded"), 2)


def test_dpo_steps_widen_the_margin_and_resume_exactly(cut_lm):
    from rlhf_studio.components.training.dpo import DPOTrainer
    cfg = DPOConfig(steps=4, batch_size=2, lr=2e-3, beta=0.5, max_completion_tokens=16, lora_r=4, lora_alpha=8)
    tr = DPOTrainer(cut_lm, cfg, PAIRS)
    first = tr.step()
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)     # LoRA B starts at 0: policy == reference
    blob = tr.state_bytes()
    later = [tr.step() for _ in range(3)]
    assert later[-1]["reward_margin"] > 0.05 and later[-1]["reward_accuracy"] == 1.0
    assert later[-1]["loss"] < first["loss"]
    again = DPOTrainer(cut_lm, cfg, PAIRS)
    again.load_state_bytes(blob)
    assert again.step_count == 1
    assert again.step()["loss"] == pytest.approx(later[0]["loss"], rel=1e-4)


def test_kto_steps_separate_good_from_bad(cut_lm):
    from rlhf_studio.components.training.kto import KTOTrainer
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS] + \
           [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in PAIRS]
    tr = KTOTrainer(cut_lm, KTOConfig(steps=3, batch_size=4, lr=2e-3, beta=0.5, max_completion_tokens=16,
                                      lora_r=4, lora_alpha=8), rows)
    ms = [tr.step() for _ in range(3)]
    assert ms[-1]["reward_desirable"] > 0 > ms[-1]["reward_undesirable"]
    assert ms[-1]["loss"] < ms[0]["loss"]
