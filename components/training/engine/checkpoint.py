"""Checkpoints: the optimizer's state, the random generators, the data order, and the online engine's whole
checkpoint and export (`OnlineCheckpoint`; the offline engine's is in offline.py).

A checkpoint is one safetensors blob (tensors + JSON metadata, nothing pickled). Its keys are a stored format:
runs stored by earlier versions must keep loading, so a key here is never renamed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...model_utils import safetensors_metadata
from .adapter import adapter_config_dict, adapter_state, save_adapter_folder


class ShuffledPass:
    """The order in which a trainer takes its prompts (or labelled rows): shuffled passes over indices 0..n-1,
    each reshuffled by `gen` when the previous one is used up. Checkpointed as a tensor `<name>.perm` and the
    position and count in the metadata (PPO: prompts.perm, prompt_pos, n_prompts; offline: rows.perm, row_pos,
    n_rows)."""

    def __init__(self, n: int, gen: torch.Generator, perm_key: str, pos_key: str, n_key: str):
        self.n, self.gen = n, gen
        self.keys = (perm_key, pos_key, n_key)
        self.perm = torch.randperm(n, generator=gen)
        self.pos = 0

    def take(self, k: int) -> list[int]:
        """The next `k` indices."""
        out = []
        while len(out) < k:
            if self.pos >= len(self.perm):
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
            out.append(int(self.perm[self.pos]))
            self.pos += 1
        return out

    def save(self, tensors: dict, meta: dict) -> None:
        perm_key, pos_key, n_key = self.keys
        tensors[perm_key] = self.perm.clone()
        meta[pos_key], meta[n_key] = self.pos, self.n

    def load(self, tensors: dict, meta: dict) -> None:
        """Resume the stored order where it stopped; a run resumed on another number of items starts afresh."""
        perm_key, pos_key, n_key = self.keys
        if meta.get(n_key) == self.n:
            self.perm, self.pos = tensors[perm_key].clone(), int(meta[pos_key])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's state as tensors `optim.<param index>.<name>` and its param groups' hyper-parameters."""
    osd = optimizer.state_dict()
    t = {f"optim.{i}.{k}": torch.as_tensor(v).detach().cpu().clone()
         for i, st in osd["state"].items() for k, v in st.items()}
    return t, [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, groups: list[dict]) -> None:
    """Restore `optimizer_tensors`' output; the hyper-parameters come from the checkpoint, the implementation
    (fused on CUDA) is this device's."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    osd = optimizer.state_dict()
    merged = [{**saved, "params": g["params"], **{k: g[k] for k in ("fused", "foreach") if k in g}}
              for g, saved in zip(osd["param_groups"], groups)]
    optimizer.load_state_dict({"state": state, "param_groups": merged})


def check_lora_shape(stored: dict, config) -> None:
    """Refuse a checkpoint whose adapter has another shape than this trainer's (stored: its config dict)."""
    for k in ("lora_r", "lora_alpha", "target_modules"):
        if stored.get(k) != getattr(config, k):
            raise ValueError(f"checkpoint has {k}={stored.get(k)!r}, trainer has {getattr(config, k)!r}")


ONLINE_STATE_FORMAT = "rlhf-studio-ppo-state/1"   # the online engine's: runs stored under it must keep loading


class OnlineCheckpoint:
    """The online engine's checkpoints and export (a mixin of OnlineEngine; reads its `lm`, `model`,
    `adapter_name`, `config`, `value_head`, `optimizer`, `_params`, `_gen`, `order` and `step_count`).

    A checkpoint holds the adapter, the value head, the optimizer's state, the RNG states and the prompt order;
    its JSON metadata (under "ppo_state") the config, the step, the algorithm's own state (`_algorithm_state`:
    PPO's KL controller) and the optimizer's hyper-parameters."""

    def _algorithm_state(self) -> dict:
        """What the algorithm adds to a checkpoint's metadata (plain JSON values; subclasses)."""
        return {}

    def _load_algorithm_state(self, meta: dict) -> None:
        """Restore `_algorithm_state` from a checkpoint's metadata (subclasses)."""

    def _checkpoint_config(self) -> dict:
        """The config as a checkpoint holds it (plain JSON values)."""
        return self.config.to_dict()

    def adapter_bytes(self) -> bytes:
        """The policy adapter's weights as safetensors bytes (peft key format, as adapter_model.safetensors);
        the adapter config is in the metadata under "adapter_config"."""
        from safetensors.torch import save
        config = adapter_config_dict(self.model, self.adapter_name)
        return save(adapter_state(self.model, self.adapter_name),
                    metadata={"format": "pt", "adapter_config": json.dumps(config)})

    def state_bytes(self) -> bytes:
        """A complete checkpoint in one safetensors blob (nothing is unpickled on loading). The format is
        ONLINE_STATE_FORMAT's, which runs stored by earlier versions hold (tests/test_stored_runs.py)."""
        from safetensors.torch import save
        t = {"adapter." + k: v for k, v in adapter_state(self.model, self.adapter_name).items()}
        t["value_head.weight"] = self.value_head.weight.detach().cpu().clone()
        t["value_head.bias"] = self.value_head.bias.detach().cpu().clone()
        optim, groups = optimizer_tensors(self.optimizer)
        t.update(optim)
        t["rng.torch"] = torch.get_rng_state().clone()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                t[f"rng.cuda.{i}"] = s.clone()
        t["rng.trainer"] = self._gen.get_state().clone()
        meta = {"format": ONLINE_STATE_FORMAT, "config": self._checkpoint_config(), "step": self.step_count,
                **self._algorithm_state(), "optim_groups": groups, "n_params": len(self._params),
                "adapter_name": self.adapter_name, "value_head_source": self.value_head_source}
        self.order.save(t, meta)
        return save(t, metadata={"format": "pt", "ppo_state": json.dumps(meta)})

    def load_state_bytes(self, blob: bytes) -> dict:
        """Restore a `state_bytes()` checkpoint into this trainer (same LoRA shape). Returns its metadata."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load
        meta_all = safetensors_metadata(blob)
        if "ppo_state" not in meta_all:
            raise ValueError("not a PPO checkpoint (no ppo_state metadata)")
        meta = json.loads(meta_all["ppo_state"])
        if meta.get("format") != ONLINE_STATE_FORMAT:
            raise ValueError(f"unsupported PPO checkpoint format {meta.get('format')!r}")
        check_lora_shape(meta["config"], self.config)
        if meta["n_params"] != len(self._params):
            raise ValueError("checkpoint does not match this trainer's parameters")
        t = load(blob)
        with self.lm.lock:
            adapter = {k[len("adapter."):]: v for k, v in t.items() if k.startswith("adapter.")}
            res = set_peft_model_state_dict(self.model, adapter, adapter_name=self.adapter_name)
            unexpected = getattr(res, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint adapter has unexpected keys, e.g. {unexpected[:3]}")
            with torch.no_grad():
                self.value_head.weight.copy_(t["value_head.weight"])
                self.value_head.bias.copy_(t["value_head.bias"])
            load_optimizer(self.optimizer, t, meta["optim_groups"])
            self._load_algorithm_state(meta)
            self.step_count = int(meta["step"])
            self.order.load(t, meta)
            self._gen.set_state(t["rng.trainer"].clone())
            torch.set_rng_state(t["rng.torch"].clone())
            if torch.cuda.is_available():
                cuda = [t[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in t]
                if len(cuda) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(cuda)
            self.value_head_source = meta.get("value_head_source", self.value_head_source)
        return meta

    def save_adapter(self, path: str | os.PathLike, merged: bool = False) -> Path:
        """Write the policy as a folder (engine/adapter.py's `save_adapter_folder`); unmerged, with the value
        head beside it (value_head.safetensors)."""
        from safetensors.torch import save_file
        with self.lm.lock:
            path = save_adapter_folder(self.lm, self.model, self.adapter_name, path, merged)
            if not merged:
                save_file({"weight": self.value_head.weight.detach().cpu().contiguous(),
                           "bias": self.value_head.bias.detach().cpu().contiguous()},
                          str(path / "value_head.safetensors"))
        return path
