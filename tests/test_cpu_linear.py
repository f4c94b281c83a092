"""CPU decode steps through oneDNN's packed weights (components/cpu_linear.py, used by the fast sampler): the same
products as torch's BLAS up to rounding, not on a LoRA adapter's own matrices, and every layer's own forward back
afterwards."""
from __future__ import annotations

import pytest
import torch

import rlhf_studio.components.cpu_linear as cpu_linear
import rlhf_studio.components.fastgen as fastgen

pytestmark = pytest.mark.skipif(not cpu_linear.packing_available(), reason="no oneDNN in this torch build")


def _model():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    lora.base_model.model[0].lora_B["default"].weight.data.normal_(0, 0.1)
    return lora


def test_packed_layers_compute_the_plain_products_and_come_back(monkeypatch):
    model = _model()
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = model(x)
        accelerate_like = lambda t: torch.nn.Linear.forward(model.base_model.model[2], t)  # noqa: E731
        model.base_model.model[2].forward = accelerate_like           # an instance forward someone put there
        with cpu_linear.packed_linears(model, 5) as applied:
            assert applied
            got = model(x)
            layer = model.base_model.model[0]
            assert "forward" in layer.base_layer.__dict__              # the base: packed
            assert "forward" not in layer.lora_A["default"].__dict__   # the trainable LoRA matrices: plain
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5) and not torch.equal(layer.lora_B["default"].weight,
                                                                                     torch.zeros(32, 4))
        assert "forward" not in layer.base_layer.__dict__
        assert model.base_model.model[2].forward is accelerate_like
        with cpu_linear.packed_linears(model, 5, enabled=False) as applied:
            assert not applied and "forward" not in layer.base_layer.__dict__
    monkeypatch.setattr(cpu_linear, "MAX_PACKED_BYTES", 64 * 96 * 4)       # the first layer's weight, not both
    with cpu_linear.packed_linears(model, 5) as applied:
        assert not applied and "forward" not in layer.base_layer.__dict__


def test_fast_sampler_decodes_through_packed_weights_as_through_blas(monkeypatch):
    """Greedy decoding of the real model (first layers) with the packed decode steps: the same tokens, and the
    sampled tokens' log-probs equal to rounding."""
    from rlhf_studio.components.models import load_model
    from rlhf_studio.components.training.engine.rollout import encode_prompts, left_pad
    from tests.layers import keep_first_layers
    lm = keep_first_layers(load_model("embedded", dtype="fp32"), 4)
    q, qm = left_pad(encode_prompts(lm, ["Name a fruit.", "Why is the sky blue?", "Say hello."], 64),
                     lm.pad_token_id)
    calls = []
    real = cpu_linear._forward
    monkeypatch.setattr(cpu_linear, "_forward", lambda p, b, x: calls.append(x.shape[0]) or real(p, b, x))

    def run(pack: bool, new_tokens: int = fastgen.MIN_PACKED_DECODE_STEPS + 1):
        monkeypatch.setattr(fastgen, "PACK_DECODE", pack)
        return fastgen.fast_generate(lm.model, q, qm, new_tokens, temperature=0.0, eos_token_id=lm.eos_token_id,
                                     pad_token_id=lm.pad_token_id, return_logprobs=True)
    run(True, new_tokens=fastgen.MIN_PACKED_DECODE_STEPS)  # too few decode steps to pay for the packing
    assert not calls
    plain, packed = run(False), run(True)
    assert calls and set(calls) == {3}                     # decode steps only: 3 rows, never the prefill's
    assert torch.equal(packed.sequences, plain.sequences)
    assert torch.allclose(packed.logprobs, plain.logprobs, atol=1e-4)
