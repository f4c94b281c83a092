"""What a checkpoint holds besides the adapter: the optimizer's state, the random generators, the data order.

A checkpoint is one safetensors blob (tensors + JSON metadata, nothing pickled). Its keys are a stored format:
runs stored by earlier versions must keep loading, so a key here is never renamed.
"""
from __future__ import annotations

import torch


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
