"""The engine of the offline algorithms (DPO, KTO): labelled texts in, sequence log-probs out, LoRA updated.

An offline trainer never samples. Each step it takes the next rows of a shuffled pass over its data, scores
(prompt, completion) texts with the policy (base + LoRA adapter) and with the reference (the same base with the
adapter off: no second copy of the model), and lets the algorithm turn those sums into a loss. Everything that
is not the algorithm lives here: tokenising, the forward passes (through the PPO engine's `forward_response`,
so the shared prompt prefix, packed rows and fused LoRA apply as in PPO), the optimiser step, checkpoints and
the adapter export.

Layout of a batch of N (prompt, completion) rows:

    query_ids     [N, P]  left-padded prompt tokens (chat template), query_mask 1 on real tokens
    response_ids  [N, R]  completion tokens + EOS, right-padded; response_mask 1 on real tokens
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import avoid_cudnn_attention, packing_supported, varlen_available
from ..fused_lora import fused_lora
from ..ppo.rollout import causal_lm_of, encode_prompts, forward_response, left_pad
from ..ppo.trainer import _reset_lora, _save_merged, adapter_params, attach_policy_adapter, safetensors_metadata

STATE_FORMAT = "rlhf-studio-train-state/1"


@dataclass
class TextBatch:
    query_ids: torch.Tensor        # [N, P] int64
    query_mask: torch.Tensor       # [N, P] int64
    response_ids: torch.Tensor     # [N, R] int64
    response_mask: torch.Tensor    # [N, R] int64
    prompt_lengths: list[int]      # [N] on the host (packing reads nothing back)


def completion_ids(lm, text: str, max_tokens: int) -> list[int]:
    """A completion's tokens as the policy would have written them: the text, then EOS (the end of the turn);
    cut to `max_tokens` (a cut completion keeps no EOS, as a sampled one that hit the limit)."""
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) + [lm.eos_token_id]
    return ids[:max_tokens]


def encode_rows(lm, prompts: list[str], completions: list[str], max_prompt_tokens: int,
                max_completion_tokens: int, device) -> TextBatch:
    """Tokenise (prompt, completion) rows into one batch (layout in the module docs)."""
    q, qm = left_pad(encode_prompts(lm, prompts, max_prompt_tokens), lm.pad_token_id, device)
    resp = [completion_ids(lm, c, max_completion_tokens) for c in completions]
    R = max(len(r) for r in resp)
    r_ids = torch.full((len(resp), R), lm.pad_token_id, dtype=torch.long)
    r_mask = torch.zeros((len(resp), R), dtype=torch.long)
    for i, r in enumerate(resp):
        r_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[i, :len(r)] = 1
    return TextBatch(q, qm, r_ids.to(device), r_mask.to(device), qm.sum(1).tolist())


class OfflineTrainer:
    """A LoRA adapter trained on fixed rows (dicts of plain values) by `loss_and_metrics` (subclasses).

    `step()` runs one optimiser step and returns its metrics; `state_bytes()` / `load_state_bytes()` checkpoint
    and resume; `save_adapter(path)` writes a PEFT adapter folder. The same surface as PPOTrainer, so the studio's
    job process drives any algorithm the same way."""

    algorithm = ""
    rows_per_step_key = "pairs_per_s"

    def __init__(self, lm, config, rows: list[dict]):
        self.lm, self.config = lm, config
        config.validate()
        if not rows:
            raise ValueError(f"{self.algorithm.upper()} needs at least one labelled row")
        self.rows = list(rows)
        self.device = torch.device(lm.device)
        avoid_cudnn_attention(self.device)
        torch.manual_seed(config.seed)
        self._gen = torch.Generator().manual_seed(config.seed)
        with lm.lock:
            self.model = attach_policy_adapter(lm, config)
            torch.manual_seed(config.seed)          # same init whether or not an adapter was trained before
            _reset_lora(self.model, config.adapter_name)
            self.model.eval()
            self.adapter_name = config.adapter_name
            self._params = adapter_params(self.model, self.adapter_name)
            decoder = causal_lm_of(self.model).get_decoder()
            # packed rows as in PPO: on CUDA only where one varlen kernel does it (not a kernel per row)
            self.pack_rows = config.pack_rows and packing_supported(
                decoder.config, config.max_prompt_tokens + config.max_completion_tokens) and (
                varlen_available(self.device, decoder.get_input_embeddings().weight.dtype)
                if self.device.type == "cuda" else True)
        self.optimizer = torch.optim.AdamW(self._params, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda" or None)
        self.step_count = 0
        self._perm = torch.randperm(len(self.rows), generator=self._gen)
        self._pos = 0
        self.notes: list[str] = []

    # ---- data order -----------------------------------------------------------------------------------------
    def next_rows(self, n: int) -> list[dict]:
        """The next `n` rows of a shuffled pass over the data (reshuffled after each pass)."""
        out = []
        while len(out) < n:
            if self._pos >= len(self._perm):
                self._perm = torch.randperm(len(self.rows), generator=self._gen)
                self._pos = 0
            out.append(self.rows[int(self._perm[self._pos])])
            self._pos += 1
        return out

    # ---- the two passes ---------------------------------------------------------------------------------------
    def encode(self, prompts: list[str], completions: list[str]) -> TextBatch:
        return encode_rows(self.lm, prompts, completions, self.config.max_prompt_tokens,
                           self.config.max_completion_tokens, self.device)

    def sequence_logps(self, b: TextBatch, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the completion tokens' log-probs [N] float32, number of completion tokens [N]) under the
        policy (with gradients where enabled) or the reference (the base, adapter off, no gradients)."""
        ctx = self.model.disable_adapter() if reference else (
            fused_lora(self.model) if self.config.fused_lora else nullcontext())
        with ctx, (torch.no_grad() if reference else nullcontext()):
            fo = forward_response(self.model, b.query_ids, b.query_mask, b.response_ids, b.response_mask, 1.0,
                                  share_prefix=self.config.share_prompt_prefix, pack=self.pack_rows,
                                  prompt_lengths=b.prompt_lengths)
        m = b.response_mask.float()
        return (fo.logp * m).sum(1), m.sum(1)

    # ---- one step ----------------------------------------------------------------------------------------------
    def loss_and_metrics(self, rows: list[dict]) -> tuple[torch.Tensor, dict]:
        """The algorithm: rows of one micro-batch -> (loss to minimise, metrics of plain floats)."""
        raise NotImplementedError

    def step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        rows = self.next_rows(cfg.batch_size)
        micro = cfg.batch_size // cfg.grad_accum
        lr = cfg.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sums: dict[str, float] = {}
        with self.lm.lock:
            self._activate()
            self.model.train(cfg.lora_dropout > 0)
            try:
                self.optimizer.zero_grad(set_to_none=True)
                for i in range(0, len(rows), micro):
                    loss, m = self.loss_and_metrics(rows[i:i + micro])
                    (loss / cfg.grad_accum).backward()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                gn = torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                    else float("inf"))
                if not math.isfinite(float(gn)):
                    raise FloatingPointError(f"{self.algorithm.upper()} gradient norm is {float(gn)}: the update "
                                             "was not applied; lower lr")
                self.optimizer.step()
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                self.model.eval()
        self.step_count += 1
        dt = time.perf_counter() - t0
        return {"step": self.step_count, **sums, "grad_norm": float(gn), "lr": lr, "t_step": dt,
                self.rows_per_step_key: cfg.batch_size / max(dt, 1e-9)}

    def _activate(self) -> None:
        if list(self.model.active_adapters) != [self.adapter_name]:
            self.model.set_adapter(self.adapter_name)
        for p in self._params:
            p.requires_grad_(True)

    # ---- checkpoints and export --------------------------------------------------------------------------------
    def _adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict
        sd = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}

    def state_bytes(self) -> bytes:
        """Adapter, optimizer state, RNG and data order in one safetensors blob (nothing pickled); JSON metadata
        holds the algorithm, config and step."""
        from safetensors.torch import save
        t = {"adapter." + k: v for k, v in self._adapter_state().items()}
        osd = self.optimizer.state_dict()
        for i, st in osd["state"].items():
            for k, v in st.items():
                t[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        t["rng.torch"] = torch.get_rng_state().clone()
        t["rng.trainer"] = self._gen.get_state().clone()
        t["rows.perm"] = self._perm.clone()
        meta = {"format": STATE_FORMAT, "algorithm": self.algorithm, "config": self.config.to_dict(),
                "step": self.step_count, "row_pos": self._pos, "n_rows": len(self.rows),
                "optim_groups": [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]}
        return save(t, metadata={"format": "pt", "train_state": json.dumps(meta)})

    def load_state_bytes(self, blob: bytes) -> dict:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load
        meta = json.loads(safetensors_metadata(blob).get("train_state", "{}"))
        if meta.get("format") != STATE_FORMAT or meta.get("algorithm") != self.algorithm:
            raise ValueError(f"not a {self.algorithm.upper()} checkpoint")
        for k in ("lora_r", "lora_alpha", "target_modules"):
            if meta["config"].get(k) != getattr(self.config, k):
                raise ValueError(f"checkpoint has {k}={meta['config'].get(k)!r}, trainer has "
                                 f"{getattr(self.config, k)!r}")
        t = load(blob)
        with self.lm.lock:
            adapter = {k[len("adapter."):]: v for k, v in t.items() if k.startswith("adapter.")}
            set_peft_model_state_dict(self.model, adapter, adapter_name=self.adapter_name)
            state: dict[int, dict] = {}
            for k, v in t.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    state.setdefault(int(i), {})[name] = v
            osd = self.optimizer.state_dict()
            groups = [{**saved, "params": g["params"], **{k: g[k] for k in ("fused", "foreach") if k in g}}
                      for g, saved in zip(osd["param_groups"], meta["optim_groups"])]
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step_count = int(meta["step"])
        if meta.get("n_rows") == len(self.rows):
            self._perm, self._pos = t["rows.perm"].clone(), int(meta["row_pos"])
        self._gen.set_state(t["rng.trainer"].clone())
        torch.set_rng_state(t["rng.torch"].clone())
        return meta

    def save_adapter(self, path, merged: bool = False) -> Path:
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or merged=True a full model."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self.lm.lock:
            if merged:
                _save_merged(self.model, self.adapter_name, path, getattr(self.lm, "quantization", None))
                self.lm.tokenizer.save_pretrained(str(path))
                return path
            save_file(self._adapter_state(), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
            cfg = self.model.peft_config[self.adapter_name].to_dict()
            cfg["inference_mode"] = True
            cfg["base_model_name_or_path"] = getattr(self.lm, "source_path", "") or cfg.get("base_model_name_or_path")
            (path / "adapter_config.json").write_text(
                json.dumps(cfg, indent=2, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        return path
