"""Generation with the real embedded model: batching, streaming, seeds, padding, bad input."""
import pytest
import torch

from rlhf_studio.components.generation import GenerationError, SamplingParams, generate
from rlhf_studio.components.models import ModelLoadError, load_model, resolve

pytestmark = pytest.mark.slow


def test_pad_is_not_eos_and_left_padding(lm):
    tok = lm.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert lm.has_chat_template
    ids = lm.prompt_ids("Hello")
    assert ids[-1] != lm.eos_token_id and len(ids) > 3


def test_batched_streamed_and_reproducible(lm):
    seen = []
    p = SamplingParams(n=4, max_new_tokens=12, temperature=0.9, seed=123)
    a = generate(lm, "Write a haiku about rain", p, on_update=seen.append)
    b = generate(lm, "Write a haiku about rain", p)
    assert len(a) == 4
    assert [g.text for g in a] == [g.text for g in b]           # fixed seed: same completions
    assert len({g.text for g in a}) > 1                          # sampling: rows differ
    assert seen and len(seen) <= 12 and seen[-1] == [g.text for g in a]   # streamed token by token
    for g in a:
        assert g.finish_reason in ("eos", "length")
        assert 1 <= g.completion_tokens <= 12
        assert g.prompt_tokens == len(lm.prompt_ids("Write a haiku about rain"))
        assert (g.finish_reason == "length") == (g.completion_tokens == 12)
    c = generate(lm, "Write a haiku about rain", SamplingParams(n=4, max_new_tokens=12, temperature=0.9, seed=124))
    assert [g.text for g in c] != [g.text for g in a]


def test_greedy_batch_matches_single(lm):
    one = generate(lm, "Name three colours.", SamplingParams(n=1, max_new_tokens=10, temperature=0))
    many = generate(lm, "Name three colours.", SamplingParams(n=3, max_new_tokens=10, temperature=0))
    assert all(g.token_ids == one[0].token_ids for g in many)


def test_stop_cancels_generation(lm):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    out = generate(lm, "Tell me a long story about a dragon.", SamplingParams(n=2, max_new_tokens=200, seed=1),
                   stop=stop)
    assert all(g.completion_tokens < 200 for g in out)
    assert all(g.finish_reason in ("stop", "eos") for g in out)


@pytest.mark.parametrize("params, message", [
    (SamplingParams(n=0), "between 1 and 8"),
    (SamplingParams(n=9), "between 1 and 8"),
    (SamplingParams(top_p=0), "top_p"),
    (SamplingParams(temperature=-1), "temperature"),
])
def test_bad_sampling_params(lm, params, message):
    with pytest.raises(GenerationError, match=message):
        generate(lm, "hi", params)


def test_empty_and_too_long_prompt(lm):
    with pytest.raises(GenerationError, match="empty"):
        generate(lm, "   \n ", SamplingParams(n=1))
    with pytest.raises(GenerationError, match="context"):
        generate(lm, "word " * 9000, SamplingParams(n=1, max_new_tokens=8))


def test_unknown_model_ids_are_refused_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve("./no/such/folder")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve("../../etc/passwd?x=1")          # a path that tries to escape is just a missing folder
    with pytest.raises(ModelLoadError, match="neither an existing folder nor"):
        resolve("owner/name; rm -rf ~")
    with pytest.raises(ModelLoadError, match="could not load model"):
        resolve("nobody-here/definitely-not-a-model-xyz")   # no hub reachable, or no such repo


def test_quantization_is_refused_clearly_where_it_cannot_run():
    """4/8-bit bases run with bitsandbytes on CUDA only; elsewhere the load says so before reading a weight."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    for q in ("4bit", "8bit"):
        with pytest.raises(ModelLoadError, match=f"{q} quantization needs a CUDA GPU"):
            load_model("embedded", quantization=q)


def test_local_folder_loads(lm, tmp_path):
    """Any local folder written by save_pretrained works (here: the embedded model's cached conversion)."""
    other = load_model(lm.source_path, dtype="fp32")
    assert other.revision.startswith("dir:")
    out = generate(other, "Say hi", SamplingParams(n=1, max_new_tokens=4, temperature=0))
    assert out[0].completion_tokens >= 1


@pytest.mark.parametrize("capability,want", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_on_cuda_follows_the_gpus_bf16_support(monkeypatch, capability, want):
    """A T4 (7.5) or V100 only emulates bf16: "auto" loads fp16 there. No GPU here, so the capability query
    stands in for one; the choice itself is the real code."""
    import torch

    from rlhf_studio.components.models import pick_dtype
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert pick_dtype(torch.device("cuda"), "auto") == getattr(torch, want)
    assert pick_dtype(torch.device("cuda"), "bf16") == torch.bfloat16      # an explicit choice is kept


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path):
    """Two first starts at once (parallel test workers, two apps) both convert the embedded GGUF. The one that
    finishes second used to delete the first one's folder while that process was loading from it; now it keeps
    the finished folder (its own copy is dropped by the caller). A folder left unfinished is replaced."""
    from rlhf_studio.components.models import _publish

    def converted(name, marker):
        d = tmp_path / name
        d.mkdir()
        (d / "complete.json").write_text("{}")
        (d / marker).write_text("")
        return d

    target = tmp_path / "models" / "smollm2"
    target.parent.mkdir()
    _publish(converted(".tmp-1", "first"), target)                  # nothing there yet: moved into place
    assert (target / "first").exists() and not (tmp_path / ".tmp-1").exists()
    ours = converted(".tmp-2", "second")
    _publish(ours, target)                                          # the other process's folder, being read
    assert (target / "first").exists() and not (target / "second").exists() and ours.exists()

    junk = tmp_path / "models" / "leftover"
    junk.mkdir()
    (junk / "model.safetensors").write_text("half written")          # no complete.json: not a finished one
    _publish(converted(".tmp-3", "third"), junk)
    assert sorted(p.name for p in junk.iterdir()) == ["complete.json", "third"]
