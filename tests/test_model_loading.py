"""Every branch of components.models.load_model runs somewhere: quantization="none" is the plain path (moved to
its device), and the 4/8-bit path builds its bitsandbytes config on any machine, then refuses clearly where
there is no CUDA GPU (bench/gpu_quant_load.py, section 8 of bench/gpu_all.sh, loads it on a GPU)."""
import pytest
import torch

from rlhf_studio.components.models import ModelLoadError, load_model, quantization_kwargs


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, lm):
    """A tiny random Llama with the embedded model's tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         vocab_size=len(lm.tokenizer)))
    d = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("q", [None, "", "none"])
def test_no_quantization_in_any_spelling_loads_the_plain_model_onto_its_device(tiny_folder, q, monkeypatch):
    moved = []
    to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        moved.append(torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None)
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    m = load_model(tiny_folder, device="cpu", dtype="fp32", quantization=q)
    assert m.quantization is None
    assert torch.device("cpu") in moved                     # "none" skipped this, so a GPU load stayed on the CPU
    assert all(p.device == m.device for p in m.model.parameters())


def test_the_quantized_branch_builds_its_config_then_refuses_without_cuda(tiny_folder):
    four = quantization_kwargs("4bit", torch.float32, torch.device("cuda", 1))
    cfg = four["quantization_config"]
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16         # fp32 compute is not offered: bf16
    assert four["device_map"] == {"": 1}
    assert quantization_kwargs("4bit", torch.float16, torch.device("cuda"))["quantization_config"] \
        .bnb_4bit_compute_dtype == torch.float16
    eight = quantization_kwargs("8bit", torch.bfloat16, torch.device("cuda"))
    assert eight["quantization_config"].load_in_8bit and eight["device_map"] == {"": 0}
    with pytest.raises(ModelLoadError, match="unknown quantization '3bit'; choose 4bit or 8bit"):
        load_model(tiny_folder, device="cpu", quantization="3bit")
    for q in ("4bit", "8bit"):
        with pytest.raises(ModelLoadError, match=f"{q} quantization needs a CUDA GPU"):
            load_model(tiny_folder, device="cpu", quantization=q)
