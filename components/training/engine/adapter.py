"""The policy as a LoRA adapter on the shared base: attach it, read its weights, sample with it merged, export it.

Every algorithm trains one adapter, `config.adapter_name`, on `lm.model` (a peft PeftModel; other adapters,
such as the deep reward tier's, stay): the policy is the base with it active, the reference the base with
adapters disabled.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ...model_utils import causal_lm_of
from .rollout import encode_prompts, left_pad, mask_after_eos, sample


def lora_config_of(config):
    from peft import LoraConfig
    tm = config.target_modules
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=tm if isinstance(tm, str) else list(tm), bias="none", task_type="CAUSAL_LM")


def attach_policy_adapter(lm, config):
    """Add a fresh LoRA adapter `config.adapter_name` to `lm.model` (wrapping it in a PeftModel if needed) and
    make it the active one. Other adapters stay. An existing adapter of that name is replaced by a fresh one.
    Returns the PeftModel (also stored back into `lm.model`)."""
    from peft import PeftModel, get_peft_model
    name, lcfg = config.adapter_name, lora_config_of(config)
    model = lm.model
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            if len(model.peft_config) == 1:
                # peft cannot delete the only adapter: re-initialise it in place (shape must match)
                old = model.peft_config[name]
                if (old.r, old.lora_alpha) != (lcfg.r, lcfg.lora_alpha):
                    raise ValueError(f"adapter {name!r} already exists with another shape; reload the model "
                                     "or choose another adapter_name")
                reset_lora(model, name)
            else:
                model.delete_adapter(name)
                model.add_adapter(name, lcfg)
        else:
            model.add_adapter(name, lcfg)
        model.set_adapter(name)
    else:
        model = get_peft_model(model, lcfg, adapter_name=name)
        lm.model = model
    return model


def reset_lora(model, name: str) -> None:
    from peft.tuners.lora import LoraLayer
    for m in model.modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            m.reset_lora_parameters(name, True)


@contextmanager
def merged_adapter(model, name: str):
    """Inside: adapter `name` is folded into temporary copies of the base weights and all adapters are disabled,
    so generation runs plain linear layers. The original weight tensors are put back on exit (no drift)."""
    from peft.tuners.lora import LoraLayer
    saved = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer) and name in m.lora_A:
                    base = m.get_base_layer()
                    w = base.weight
                    merged = (w.float() + m.get_delta_weight(name).float()).to(w.dtype)
                    saved.append((base, w))
                    base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, w in saved:
            base.weight = w


def adapter_params(model, name: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of adapter `name`, in a stable order."""
    ps = [p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n + "."]
    if not ps:
        raise RuntimeError(f"adapter {name!r} has no LoRA parameters")
    return ps


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights (peft key format, as adapter_model.safetensors), on the CPU."""
    from peft import get_peft_model_state_dict
    sd = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def adapter_config_dict(model, name: str) -> dict:
    """Adapter `name`'s peft config as plain JSON values, for inference."""
    d = model.peft_config[name].to_dict()
    d["inference_mode"] = True
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def save_adapter_folder(lm, model, name: str, path: str | os.PathLike, merged: bool = False) -> Path:
    """Write adapter `name` as a folder: adapter_config.json + adapter_model.safetensors, loadable with
    `peft.PeftModel.from_pretrained(base_model, path)`; or merged=True a full model folder (base weights + LoRA
    delta, config, tokenizer) loadable with `AutoModelForCausalLM.from_pretrained(path)` (not for 4/8-bit
    bases). Call under `lm.lock`."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if merged:
        save_merged(model, name, path, getattr(lm, "quantization", None))
        try:
            lm.tokenizer.save_pretrained(str(path))
        except Exception:
            pass
        return path
    save_file(adapter_state(model, name), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = adapter_config_dict(model, name)
    cfg["base_model_name_or_path"] = getattr(lm, "source_path", "") or cfg.get("base_model_name_or_path")
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path


@torch.no_grad()
def save_merged(model, adapter_name: str, path: Path, quantization) -> None:
    """Base weights + this adapter's LoRA delta, saved as a plain transformers model folder."""
    if quantization:
        raise ValueError("merged export needs an unquantized base (load it in bf16/fp32)")
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    lm = causal_lm_of(model)
    sd: dict[str, torch.Tensor] = {}
    lora_modules = {n: m for n, m in lm.named_modules() if isinstance(m, LoraLayer)}
    for name, m in lora_modules.items():
        base = m.get_base_layer()
        w = base.weight.detach()
        if adapter_name in m.lora_A:
            w = (w.float() + m.get_delta_weight(adapter_name).float()).to(w.dtype)
        sd[f"{name}.weight"] = w
        if getattr(base, "bias", None) is not None:
            sd[f"{name}.bias"] = base.bias.detach()
    for n, p in lm.state_dict().items():          # persistent tensors only (no rotary caches)
        if "lora_" in n or ".base_layer." in n:
            continue
        sd.setdefault(n, p.detach())
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(lm.config, dtype=next(lm.parameters()).dtype)
    missing, unexpected = clean.load_state_dict(sd, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(lm.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merged export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        clean.tie_weights()
    clean.generation_config = lm.generation_config
    clean.save_pretrained(str(path))


def decode(tok, ids) -> str:
    try:
        return tok.decode(ids, skip_special_tokens=True)
    except Exception:
        return " ".join(map(str, ids))



def generate_with_adapter(lm, prompts: list, adapter_name: str | None = "policy", max_new_tokens: int = 64,
                          temperature: float = 0.7, top_p: float = 1.0, greedy: bool = False,
                          max_prompt_tokens: int = 1024) -> list[str]:
    """Generate one response per prompt with adapter `adapter_name` of `lm.model` (None: the base model with
    all adapters disabled). The previously active adapter is restored afterwards."""
    from peft import PeftModel
    model = lm.model
    with lm.lock, torch.no_grad():
        seqs = encode_prompts(lm, prompts, max_prompt_tokens)
        q, qm = left_pad(seqs, lm.pad_token_id, lm.device)
        if isinstance(model, PeftModel):
            prev = list(model.active_adapters)
            if adapter_name is None:
                ctx = model.disable_adapter()
            else:
                if adapter_name not in model.peft_config:
                    raise ValueError(f"no adapter named {adapter_name!r} on this model")
                model.set_adapter(adapter_name)
                ctx = nullcontext()
            try:
                with ctx:
                    resp = sample(model, q, qm, max_new_tokens, temperature, top_p, lm.eos_token_id,
                                  lm.pad_token_id, greedy=greedy)
            finally:
                if adapter_name is not None and prev and prev != [adapter_name]:
                    model.set_adapter(prev[0] if len(prev) == 1 else prev)
        else:
            if adapter_name is not None:
                raise ValueError("this model has no adapters")
            resp = sample(model, q, qm, max_new_tokens, temperature, top_p, lm.eos_token_id, lm.pad_token_id,
                          greedy=greedy)
        rmask, _ = mask_after_eos(resp, lm.eos_token_id)
    return [decode(lm.tokenizer, resp[i, : int(rmask[i].sum())].tolist()) for i in range(len(prompts))]


class PolicyAdapter:
    """What every trainer does with its adapter (the online and the offline engines inherit it): attach it
    seeded, make it the active and trainable one, read its weights."""

    lm = model = adapter_name = None
    _lora: list

    def _attach_policy(self, lm, config) -> None:
        """Seed, attach a fresh adapter `config.adapter_name` and keep its LoRA parameters (under `lm.lock`)."""
        self.model = attach_policy_adapter(lm, config)
        # a fresh peft wrap and a re-attached adapter draw their init differently: re-draw it here, so a seed gives
        # the same run whether or not this model has trained an adapter before in this process
        torch.manual_seed(config.seed)
        reset_lora(self.model, config.adapter_name)
        self.model.eval()
        self.adapter_name = config.adapter_name
        self._lora = adapter_params(self.model, self.adapter_name)

    def _activate_policy(self) -> None:
        """Make the policy adapter active and trainable again (a reward function may have switched adapters)."""
        if list(self.model.active_adapters) != [self.adapter_name]:
            self.model.set_adapter(self.adapter_name)
        for p in self._lora:
            p.requires_grad_(True)

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model, self.adapter_name)
