"""Switching LoRA adapters on one shared base model.

Policy adapters (PPO), reward adapters (deep tier) and the plain base all live on one loaded model;
`use_adapter(model, name)` makes one of them active for a block of code and restores the previous state.
"""
from __future__ import annotations

import contextlib

from .model_utils import is_peft


def adapter_names(model) -> list[str]:
    return sorted(getattr(model, "peft_config", {}) or {})


@contextlib.contextmanager
def use_adapter(model, name: str | None):
    """Run the block with adapter `name` active, or with every adapter disabled when name is None."""
    if not is_peft(model):
        if name is not None:
            raise KeyError(f"adapter {name!r} is not loaded (the model has no adapters)")
        yield model
        return
    if name is None:
        with model.disable_adapter():
            yield model
        return
    if name not in model.peft_config:
        raise KeyError(f"adapter {name!r} is not loaded; loaded: {', '.join(adapter_names(model)) or 'none'}")
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield model
    finally:
        if previous in model.peft_config:
            model.set_adapter(previous)


# ---------------------------------------------------------------- adapter files as one BLOB
# A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, + the PPO value head) packed in a zip, so it can live in the
# DuckDB file. Unpacking accepts only those two names (plus a README): no paths, no pickles, nothing executable.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "README.md")


class AdapterFormatError(ValueError):
    """The bytes are not an adapter written by RLHF Studio."""


def pack_adapter_dir(path) -> bytes:
    import io
    import os
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name in ADAPTER_FILES:
            p = os.path.join(path, name)
            if os.path.exists(p):
                z.write(p, arcname=name)
    return buf.getvalue()


def unpack_adapter(blob: bytes, path) -> str:
    """Write the adapter folder to `path` after checking that it is exactly what it claims to be."""
    import io
    import json
    import os
    import zipfile
    try:
        z = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile:
        raise AdapterFormatError("this is not an adapter archive (not a zip written by RLHF Studio)") from None
    names = z.namelist()
    bad = [n for n in names if n not in ADAPTER_FILES]
    if bad or "adapter_config.json" not in names or "adapter_model.safetensors" not in names:
        raise AdapterFormatError(f"unexpected adapter contents {names!r}: expected adapter_config.json and "
                                 "adapter_model.safetensors only")
    try:
        cfg = json.loads(z.read("adapter_config.json"))
    except ValueError:
        raise AdapterFormatError("adapter_config.json is not valid JSON") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise AdapterFormatError("adapter_config.json does not describe a LoRA adapter")
    from safetensors import safe_open
    os.makedirs(path, exist_ok=True)
    for n in names:
        with open(os.path.join(path, n), "wb") as f:
            f.write(z.read(n))
    try:
        with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception:
        raise AdapterFormatError("adapter_model.safetensors is not a valid safetensors file") from None
    return str(path)


def check_fits(model, path) -> None:
    """Raise AdapterFormatError unless every LoRA tensor of the adapter folder `path` matches a linear layer of
    `model` (same module path, in/out features). Checked before loading because peft injects the LoRA layers into
    the base model in place before it loads the weights: a mismatch found then leaves the base half-modified."""
    import os
    from safetensors import safe_open
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if not shapes:
        raise AdapterFormatError("adapter_model.safetensors holds no tensors")
    for key, shape in shapes.items():
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                break
        else:
            continue
        module_path = key.split(part)[0]
        if module_path.startswith("base_model.model."):
            module_path = module_path[len("base_model.model."):]
        try:
            module = base.get_submodule(module_path)
        except AttributeError:
            raise AdapterFormatError(f"does not fit this model: it has no layer {module_path!r}") from None
        layer = getattr(module, "base_layer", module)
        n_in, n_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if n_in is None or n_out is None or len(shape) != 2:
            raise AdapterFormatError(f"does not fit this model: {module_path!r} is not a linear layer")
        want = shape[1] == n_in if part == ".lora_A." else shape[0] == n_out
        if not want:
            raise AdapterFormatError(f"does not fit this model: {key} has shape {list(shape)}, the layer is "
                                     f"{n_in} -> {n_out}")


def load_adapter_blob(model, blob: bytes, name: str):
    """Attach an adapter BLOB to `model` under `name`; returns the (possibly wrapped) PEFT model."""
    import tempfile
    from peft import PeftModel
    with tempfile.TemporaryDirectory() as d:
        unpack_adapter(blob, d)
        check_fits(model, d)
        if is_peft(model):
            if name not in model.peft_config:
                model.load_adapter(d, adapter_name=name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, d, adapter_name=name, is_trainable=False)
