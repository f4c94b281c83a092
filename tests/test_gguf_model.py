"""`--model path/to/model.gguf`: a local GGUF file loads like the embedded model (converted once to
safetensors, cached by content hash), tested with the embedded package's own GGUF file given as a path."""
import pytest
import torch

from rlhf_studio.components.models import ModelLoadError, embedded_gguf_path, load_model


def test_a_gguf_path_loads_like_the_embedded_model(lm, tmp_path):
    gguf = embedded_gguf_path()
    assert gguf is not None and gguf.suffix == ".gguf"
    other = load_model(str(gguf), device="cpu", dtype="fp32")
    assert other.revision == lm.revision and other.revision.startswith("gguf-sha256:")
    assert other.model_id == str(gguf) and other.source_path == lm.source_path     # the cached conversion
    a, b = other.model.get_input_embeddings().weight, lm.model.get_input_embeddings().weight
    assert torch.equal(a, b.to(a.dtype))
    assert other.prompt_ids("Hi") == lm.prompt_ids("Hi") and other.pad_token_id == lm.pad_token_id
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="could not convert the GGUF file"):
        load_model(str(bad))
