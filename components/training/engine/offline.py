"""The engine of the offline algorithms (DPO, KTO): labelled texts in, sequence log-probs out, LoRA updated.

An offline trainer never samples. Each step it takes the next rows of a shuffled pass over its data, scores
(prompt, completion) texts with the policy (base + LoRA adapter) and with the reference (the same base with the
adapter off: no second copy of the model), and lets the algorithm turn those sums into a loss. Everything that
is not the algorithm lives here: tokenising, the forward passes (through the engine's `forward_response`, so
the shared prompt prefix, packed rows and fused LoRA apply as in PPO), the optimiser step, checkpoints and
the adapter export. An algorithm (components/training/dpo.py, kto.py) subclasses `OfflineEngine` with
`loss_and_metrics`.

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

from ...attention import avoid_cudnn_attention
from ...fused_lora import fused_lora
from ...model_utils import causal_lm_of, safetensors_metadata
from .acceleration import row_layout
from .adapter import PolicyAdapter, save_adapter_folder
from .checkpoint import ShuffledPass, check_lora_shape, load_optimizer, optimizer_tensors
from .rollout import encode_prompts, forward_response, left_pad

STATE_FORMAT = "rlhf-studio-train-state/1"     # a stored format: runs stored under it must keep loading


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


class OfflineEngine(PolicyAdapter):
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
            self._attach_policy(lm, config)
            self._params = self._lora
            decoder = causal_lm_of(self.model).get_decoder()
            self.pack_rows = row_layout(config.pack_rows, config.tree_rows, decoder,
                                        config.max_prompt_tokens + config.max_completion_tokens, self.device, False)
        self.optimizer = torch.optim.AdamW(self._params, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda" or None)
        self.step_count = 0
        self.order = ShuffledPass(len(self.rows), self._gen, "rows.perm", "row_pos", "n_rows")
        self.notes: list[str] = []
        # (prompt, completion) -> reference log-prob sum of a labelled row (config.cache_reference). Keyed by the
        # texts, not by row index: a data-parallel worker's `next_rows` (components/distributed.py) hands out
        # rows, not indices; each worker has its own engine, so its own cache. The lengths and the chat template
        # that also shape the sum are fixed for the engine's life. In memory only, never in a checkpoint: a
        # resumed run starts empty and recomputes the sums as the rows come back.
        self.reference_cache: dict[tuple[str, str], float] = {}

    # ---- data order -----------------------------------------------------------------------------------------
    def next_rows(self, n: int) -> list[dict]:
        """The next `n` rows of a shuffled pass over the data (reshuffled after each pass)."""
        return [self.rows[i] for i in self.order.take(n)]

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

    def reference_logps(self, prompts: list[str], completions: list[str], labelled: int | None = None,
                        batch: TextBatch | None = None) -> torch.Tensor:
        """Reference log-prob sums [N] float32 of (prompt, completion) rows, from one no-grad forward over the
        rows not known yet, in their order. The first `labelled` rows (default: all) are labelled rows: with
        `config.cache_reference` their sums are kept and not computed again; the others (KTO's mismatched rows,
        drawn anew each step) are always scored. `batch`: all the rows already encoded, reused when none is
        cached."""
        keys = list(zip(prompts, completions))
        n_lab = len(keys) if labelled is None else labelled
        cache = self.reference_cache if self.config.cache_reference else None
        fresh = keys if cache is None or not any(k in cache for k in keys[:n_lab]) else \
            list(dict.fromkeys(k for k in keys[:n_lab] if k not in cache)) + keys[n_lab:]
        n_new = len(fresh) - (len(keys) - n_lab)            # labelled rows among those scored now
        sums = torch.zeros(0, device=self.device)
        if fresh:
            b = batch if batch is not None and fresh is keys else self.encode(*map(list, zip(*fresh)))
            sums = self.sequence_logps(b, reference=True)[0]
        if cache is None:
            return sums
        cache.update(zip(fresh[:n_new], sums[:n_new].tolist()))
        if fresh is keys:
            return sums
        known = torch.tensor([cache[k] for k in keys[:n_lab]], dtype=torch.float32, device=self.device)
        return torch.cat([known, sums[n_new:]])

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
            self._activate_policy()
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

    # ---- checkpoints and export --------------------------------------------------------------------------------
    def state_bytes(self) -> bytes:
        """Adapter, optimizer state, RNG and data order in one safetensors blob (nothing pickled); JSON metadata
        holds the algorithm, config and step. The format is STATE_FORMAT's (tests/test_stored_runs.py)."""
        from safetensors.torch import save
        t = {"adapter." + k: v for k, v in self._adapter_state().items()}
        optim, groups = optimizer_tensors(self.optimizer)
        t.update(optim)
        t["rng.torch"] = torch.get_rng_state().clone()
        t["rng.trainer"] = self._gen.get_state().clone()
        meta = {"format": STATE_FORMAT, "algorithm": self.algorithm, "config": self.config.to_dict(),
                "step": self.step_count, "optim_groups": groups}
        self.order.save(t, meta)
        return save(t, metadata={"format": "pt", "train_state": json.dumps(meta)})

    def load_state_bytes(self, blob: bytes) -> dict:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load
        meta = json.loads(safetensors_metadata(blob).get("train_state", "{}"))
        if meta.get("format") != STATE_FORMAT or meta.get("algorithm") != self.algorithm:
            raise ValueError(f"not a {self.algorithm.upper()} checkpoint")
        check_lora_shape(meta["config"], self.config)
        t = load(blob)
        with self.lm.lock:
            adapter = {k[len("adapter."):]: v for k, v in t.items() if k.startswith("adapter.")}
            set_peft_model_state_dict(self.model, adapter, adapter_name=self.adapter_name)
            load_optimizer(self.optimizer, t, meta["optim_groups"])
        self.step_count = int(meta["step"])
        self.order.load(t, meta)
        self._gen.set_state(t["rng.trainer"].clone())
        torch.set_rng_state(t["rng.torch"].clone())
        return meta

    def save_adapter(self, path, merged: bool = False) -> Path:
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or merged=True a full model."""
        with self.lm.lock:
            return save_adapter_folder(self.lm, self.model, self.adapter_name, path, merged)
