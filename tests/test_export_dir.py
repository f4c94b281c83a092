"""Files only where they belong: the app writes exports inside the export folder (`--export-dir`, default beside
the database) or into browser downloads that are removed once served and at close; a path that leads out of
the export folder is refused."""
import os
import time

import pytest

from rlhf_studio.components.adapters import pack_adapter_dir
from rlhf_studio import StudioError


@pytest.fixture(scope="module")
def lora_blob(tmp_path_factory) -> bytes:
    """A real (tiny) PEFT LoRA adapter archive: exporting it without merging only unpacks the files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=128))
    d = tmp_path_factory.mktemp("lora")
    get_peft_model(tiny, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(d)
    return pack_adapter_dir(d)


@pytest.fixture
def with_adapter(studio, lora_blob):
    aid = studio.store.add_adapter(name="tiny", weights=lora_blob, config={}, base_model_id="tiny")
    return studio, aid


def test_the_export_folder_is_beside_the_database_by_default(studio, tmp_path):
    db = os.path.abspath(studio.db_path)
    assert studio.export_dir == os.path.join(os.path.dirname(db), os.path.splitext(os.path.basename(db))[0]
                                             + "-exports")


def test_paths_that_lead_out_of_the_export_folder_are_refused(with_adapter, tmp_path):
    s, aid = with_adapter
    root = os.path.realpath(s.export_dir)
    assert s.resolve_export_path("my-adapter") == os.path.join(root, "my-adapter")
    assert s.resolve_export_path(os.path.join(root, "a", "b")) == os.path.join(root, "a", "b")
    outside = tmp_path / "outside"
    os.symlink(outside, os.path.join(root, "link"))          # a link inside that points out
    for bad in ("../outside", str(outside), "a/../../outside", "link", "link/x", ".", "", "  ", "x\0y"):
        with pytest.raises(StudioError, match="export folder"):
            s.app_export_adapter(aid, bad)
    assert not outside.exists()
    path = s.app_export_adapter(aid, "my-adapter")
    assert path == os.path.join(root, "my-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(path))


def test_downloads_are_removed_once_served_and_at_close(studio):
    cs = studio.generate("Name a fruit.", n=2, max_new_tokens=4, seed=0)
    studio.compare(cs[0].id, cs[1].id, "a")
    n, path = studio.export_download("preference", "jsonl")
    assert n == 1 and os.path.getsize(path) > 0
    assert not path.startswith(os.path.realpath(studio.export_dir))   # a private temporary folder
    studio.drop_download(path)
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    studio.download_keep_s = 0.2
    n, later = studio.export_download("preference", "parquet")
    for _ in range(100):
        if not os.path.exists(later):
            break
        time.sleep(0.05)
    assert not os.path.exists(later)                                 # removed soon after it was made
    studio.download_keep_s = 600
    n, raw = studio.export_download("raw", "parquet")
    assert raw.endswith(".zip") and os.path.exists(raw)
    studio.drop_download("/etc/hostname")                            # not a download: left alone
    assert os.path.exists("/etc/hostname")
    studio.close()
    assert not os.path.exists(raw) and not os.path.exists(os.path.dirname(os.path.dirname(raw)))


@pytest.mark.slow
def test_the_app_passes_the_users_string_and_the_studio_refuses_or_confines_it(with_adapter, tmp_path):
    """Through the running app's own endpoints, as a visitor's browser or API client calls them."""
    from gradio_client import Client
    s, aid = with_adapter
    s.download_keep_s = 2.0
    app = s.launch(port=None, max_queue=8)
    client = Client(app.local_url, verbose=False)
    escape = os.path.relpath(tmp_path / "escaped", os.getcwd())
    msg = client.predict(str(aid), escape, False, api_name="/export_adapter")
    assert "outside the export folder" in msg and not (tmp_path / "escaped").exists(), msg
    msg = client.predict(str(aid), str(tmp_path / "abs"), False, api_name="/export_adapter")
    assert "outside the export folder" in msg and not (tmp_path / "abs").exists(), msg
    msg = client.predict(str(aid), "inside", False, api_name="/export_adapter")
    assert os.path.isdir(os.path.join(s.export_dir, "inside")), msg
    cs = s.generate("Name a fruit.", n=2, max_new_tokens=4, seed=0)
    s.compare(cs[0].id, cs[1].id, "a")
    msg, got = client.predict("preference", "jsonl", False, "(all criteria)", api_name="/export_data")
    assert "exported 1 rows" in msg and os.path.getsize(got) > 0
    made = s._downloads._dir
    for _ in range(100):                      # removed once served (the client holds Gradio's copy)
        if not os.listdir(made):
            break
        time.sleep(0.1)
    assert os.listdir(made) == [] and os.path.getsize(got) > 0
