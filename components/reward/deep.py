"""Deep tier: a LoRA adapter on the shared base model plus a scalar head, trained with the Bradley-Terry loss.

Score of a prompt+completion: head(pool_features(final hidden states with the reward adapter active)), where
head(f) = ((f - mean) / std) @ weight + bias is the fast tier's linear probe (`FastRewardModel.to_torch_head`).
With the probe as the head's start and LoRA's B matrices at zero, a new deep model scores exactly like the
probe; training then moves adapter and head together (loss -log sigmoid(r_c - r_r - margin)).

Sharing one base model (`lm.model`) with generation and PPO:
- The first DeepRewardModel on a plain model wraps it with `peft.get_peft_model` and sets `lm.model` to the
  PeftModel; on a PeftModel it calls `add_adapter`. Either way the adapter ("reward" or the caller's name)
  is switched off everywhere right after it is created: the active adapters, the disabled flags and the
  requires_grad flags that the model had before are restored, so generation (and a PPO policy adapter) behave
  exactly as before. The reward adapter is only switched on, layer by layer, inside this module's own forward
  passes (`DeepRewardModel.active()`), which restore the previous state on exit; its parameters have
  requires_grad=False outside its training steps, so an optimizer built from `requires_grad` never sees them.
- Locking: every forward/backward of one micro-batch (`micro_batch_size` pairs) takes `lm.lock` and releases
  it afterwards, so generation can interleave with training; the optimizer step runs outside the lock (it
  only touches the reward adapter and head, which nothing else uses). Callers need not hold the lock.
- The model is left in eval mode (no dropout toggling that would change generation); lora_dropout is 0.

Top layers only (config.lora_layers = k): the adapter goes on the last k decoder layers. Backward then stops
at layer L-k, and the base hidden state entering that layer (the "trunk", which the reward adapter does not
change) can be cached per text (config.trunk_cache_mb), so epochs and replay after the first pass only run
k layers. `extract_features_and_trunks` computes the fast tier's features and these trunks in one pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..attention import avoid_cudnn_attention
from ..fused_lora import fused_lora
from ..model_utils import is_peft, position_ids_from_mask, safetensors_metadata
from .bt import bt_loss
from .extract import Cancelled, base_model_mode, collate, encode_texts, final_hidden, length_batches
from .features import pool_features

FORMAT = "rlhf-studio-deep-reward"
VERSION = "1"


@dataclass
class DeepRewardConfig:
    """Settings of the deep tier. Defaults suit a ~135M model on a CPU; all are saved with the state."""
    lora_r: int = 16                 # LoRA rank
    lora_alpha: int = 32             # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0        # dropout on the LoRA input (0: the shared model stays in eval mode)
    lora_layers: int | None = 4      # adapter on the last k decoder layers only (None: every layer); all
                                     # linear modules of those layers either way. On HH (GPU sweep) the top
                                     # 4 layers did as well as 8 or 16, and a CPU step costs ~k/30 of a
                                     # full-depth one; None trains every layer (slow on a CPU)
    lr: float = 2e-4                 # AdamW learning rate of the LoRA weights
    head_lr: float = 2e-4            # AdamW learning rate of the head (weight on standardised features, bias)
    weight_decay: float = 0.0        # AdamW weight decay (LoRA and head)
    epochs: int = 2                  # passes over pairs_new (+ replay) per train() call
    batch_size: int = 8              # pairs per optimizer step
    micro_batch_size: int = 2        # pairs per forward/backward; lm.lock is held for one micro-batch
    max_tokens: int = 256            # left truncation of prompt+completion+EOS (keeps the end)
    replay_ratio: float = 1.0        # replay pairs drawn per new pair and epoch (from pairs_replay)
    warmup_fraction: float = 0.1     # linear warm-up share of the steps of one train() call, then cosine
    min_lr_fraction: float = 0.1     # cosine decay floor, as a share of lr
    grad_clip: float = 1.0           # max global grad norm (0: off)
    seed: int = 0                    # LoRA init, pair order and replay sampling
    trunk_cache_mb: int = 256        # cache of base hidden states below the adapter (lora_layers only); 0: off
    trunk_layer: int | None = None   # decoder layer whose input is cached (None: the first adapter layer);
                                     # lower values let one cache serve several lora_layers settings
    probe_weight: float = 0.6        # share of the frozen probe in score(): (1 - w) * head(adapter features)
                                     # + w * probe(base features). Shrinks the fine-tuned model towards the
                                     # probe (an ensemble); 0: the fine-tuned model alone. Training ignores it.

    @classmethod
    def from_dict(cls, d: dict) -> "DeepRewardConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_settings(cls, settings: dict) -> "DeepRewardConfig":
        """A config from settings a user gave: unknown names and bad values raise ValueError saying which."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown deep reward-model settings: {', '.join(unknown)} (known: {', '.join(names)})")
        cfg = cls(**settings)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def whole(name, low, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be a whole number >= {low}{' or None' if optional else ''}, got {v!r}")

        def real(name, low, high=math.inf, open_low=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v > low if open_low else v >= low) and v <= high
            if not ok:
                bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
                raise ValueError(f"{name} must be a number {bound}, got {v!r}")
        for name in ("lora_r", "epochs", "batch_size", "micro_batch_size"):
            whole(name, 1)
        whole("lora_layers", 1, optional=True)
        whole("trunk_layer", 0, optional=True)
        whole("max_tokens", 8)
        whole("trunk_cache_mb", 0)
        whole("seed", 0)
        real("lora_alpha", 0, open_low=True)
        real("lr", 0, open_low=True)
        real("head_lr", 0, open_low=True)
        real("lora_dropout", 0, 0.99)
        for name in ("warmup_fraction", "min_lr_fraction", "probe_weight"):
            real(name, 0, 1)
        for name in ("weight_decay", "replay_ratio", "grad_clip"):
            real(name, 0)


class RewardHead(nn.Module):
    """score = ((f - mean) / std) @ weight + bias; mean/std are fixed buffers, weight/bias are trained."""

    def __init__(self, n_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_features))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return ((f.float() - self.mean) / self.std) @ self.weight + self.bias

    @torch.no_grad()
    def load_probe(self, probe) -> None:
        """Copy a fast-tier probe: a FastRewardModel or a (weight, bias, mean, std) tuple."""
        if hasattr(probe, "to_torch_head"):
            probe = probe.to_torch_head()
        w, b, mean, std = (torch.as_tensor(t, dtype=torch.float32) for t in probe)
        if w.shape != self.weight.shape:
            raise ValueError(f"the probe has {w.numel()} features, the model's pooled feature has "
                             f"{self.weight.numel()}")
        self.weight.copy_(w)
        self.bias.copy_(b.reshape(()))
        self.mean.copy_(mean)
        self.std.copy_(std)


# ------------------------------------------------------------------------------------------ adapter plumbing

def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _decoder(model):
    base = model.get_base_model() if is_peft(model) else model
    return base.get_decoder()


def _linear_names(model) -> list[str]:
    """Names of the linear modules of one decoder layer (q_proj, ..., down_proj for llama)."""
    layer = _decoder(model).layers[0]
    names = set()
    for n, m in layer.named_modules():
        base = getattr(m, "base_layer", None)
        if isinstance(m, nn.Linear) or isinstance(base, nn.Linear):
            leaf = n.split(".")[-1]
            if leaf and leaf != "base_layer" and not leaf.startswith("lora_") and leaf not in ("default",):
                names.add(leaf)
    return sorted(names)


def _lora_config(cfg: DeepRewardConfig, num_layers: int, targets: list[str]):
    from peft import LoraConfig
    kw = {}
    if cfg.lora_layers:
        k = max(1, min(int(cfg.lora_layers), num_layers))
        kw = {"layers_to_transform": list(range(num_layers - k, num_layers)), "layers_pattern": "layers"}
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM", **kw)


def _same_lora(a, b) -> bool:
    keys = ("r", "lora_alpha", "lora_dropout", "layers_to_transform")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def ensure_adapter(lm, name: str, cfg: DeepRewardConfig, replace: bool = False) -> bool:
    """Put a LoRA adapter `name` on lm.model (wrapping it in a PeftModel if needed), switched off.

    Returns True if it was created, False if an adapter of that name and shape was already there. An adapter of
    that name with another shape is an error, unless `replace` (the caller owns the name, e.g. the studio's
    reward service, whose versions all live in its database): then it is deleted and made anew.
    """
    from peft import get_peft_model
    num_layers = int(lm.model.config.num_hidden_layers)
    lcfg = _lora_config(cfg, num_layers, _linear_names(lm.model))
    with lm.lock:
        model = lm.model
        if is_peft(model) and name in model.peft_config:
            if _same_lora(model.peft_config[name], lcfg):
                return False
            if not replace:
                raise ValueError(f"the model already has an adapter {name!r} of another shape; "
                                 "use another adapter name")
        was_peft = is_peft(model)
        before = {id(m): (m._active_adapter, m._disable_adapters) for m in _tuner_layers(model)} if was_peft else {}
        grads = {id(p): p.requires_grad for p in model.parameters()}
        if was_peft:
            prev_active = [a for a in model.active_adapters if a != name]
            prev_disabled = any(d for _, d in before.values())
            model_active = model.base_model.active_adapter
        else:
            prev_active, prev_disabled, model_active = [], False, None
        if was_peft and name in model.peft_config:      # replace: peft re-points the active adapter on delete,
            with warnings.catch_warnings():              # the states saved above are put back below
                warnings.simplefilter("ignore")
                model.delete_adapter(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if was_peft:
                model.add_adapter(name, lcfg)
            else:
                model = get_peft_model(model, lcfg, adapter_name=name)
                lm.model = model
        for m in _tuner_layers(model):
            if id(m) in before:
                m._active_adapter, m._disable_adapters = before[id(m)]
            else:
                m._active_adapter, m._disable_adapters = list(prev_active), prev_disabled
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), False))
        if was_peft:
            model.base_model.active_adapter = model_active
        return True


@contextlib.contextmanager
def only_adapter(model, name: str | None, trainable: bool = False, params: Sequence[nn.Parameter] = ()):
    """Inside: exactly adapter `name` is active in every tuner layer (layers without it run the base; None:
    no adapter at all, the base model); `params` get requires_grad=trainable. Everything is restored on exit."""
    layers = _tuner_layers(model)
    saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
    saved_grad = [(p, p.requires_grad) for p in params]
    try:
        for m in layers:
            m._active_adapter, m._disable_adapters = ([name] if name else []), False
        for p in params:
            p.requires_grad_(trainable)
        yield
    finally:
        for m, a, d in saved:
            m._active_adapter, m._disable_adapters = a, d
        for p, g in saved_grad:
            p.requires_grad_(g)


def _model_dtype(lm) -> torch.dtype:
    return _decoder(lm.model).get_input_embeddings().weight.dtype


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _capture_input(layer: nn.Module, sink: list, stop: bool):
    """Record the hidden states entering `layer`; with stop, abort the forward right there."""
    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        sink.append(h)
        if stop:
            raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _top_hidden(model, split: int, trunk: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states computed from the hidden states entering decoder layer `split`.

    Runs the decoder's own forward with `inputs_embeds=trunk` and its layer list cut to layers[split:] for the
    duration of the call (caller holds lm.lock), so masks, rotary positions and the final norm are the model's.
    """
    dec = _decoder(model)
    full = dec.layers
    try:
        dec.layers = nn.ModuleList(list(full)[split:])
        out = dec(inputs_embeds=trunk, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        dec.layers = full
    return out.last_hidden_state


def advance_trunks(lm, trunks: Sequence[torch.Tensor], from_layer: int, to_layer: int, batch_size: int = 8
                   ) -> list[torch.Tensor]:
    """Base hidden states entering layer `to_layer`, from those entering `from_layer` (runs the layers in
    between once, no adapters, no grad), e.g. to reuse a lower cache with a smaller lora_layers."""
    if not 0 < from_layer <= to_layer:
        raise ValueError("need 0 < from_layer <= to_layer")
    if from_layer == to_layer:
        return list(trunks)
    dt = _model_dtype(lm)
    out: list = [None] * len(trunks)
    for idx in length_batches([t.shape[0] for t in trunks], batch_size):
        T = max(trunks[i].shape[0] for i in idx)
        x = torch.zeros((len(idx), T, trunks[idx[0]].shape[-1]), dtype=dt, device=lm.device)
        am = torch.zeros((len(idx), T), dtype=torch.long, device=lm.device)
        for r, i in enumerate(idx):
            n = trunks[i].shape[0]
            x[r, :n] = trunks[i].to(lm.device, dt)
            am[r, :n] = 1
        sink: list = []
        with lm.lock, torch.no_grad(), only_adapter(lm.model, None):
            dec = _decoder(lm.model)
            full = dec.layers
            try:
                dec.layers = nn.ModuleList(list(full)[from_layer:to_layer])
                with _capture_input(dec.norm, sink, stop=True):
                    try:
                        dec(inputs_embeds=x, attention_mask=am, position_ids=position_ids_from_mask(am),
                            use_cache=False)
                    except _Stop:
                        pass
            finally:
                dec.layers = full
        for r, i in enumerate(idx):
            out[i] = sink[0][r, :trunks[i].shape[0]].detach().to(trunks[i].device, trunks[i].dtype).clone()
    return out


def extract_features_and_trunks(lm, prompts: Sequence[str], completions: Sequence[str], split_layer: int,
                                batch_size: int = 8, max_tokens: int = 256,
                                progress: Callable[[int, int], None] | None = None,
                                stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, list[torch.Tensor]]:
    """One base-model pass giving extract_features' features and, per text, the base hidden states entering
    decoder layer `split_layer` ([n_tokens, hidden], model dtype, CPU) for DeepRewardModel.put_trunks."""
    seqs, n_resp = encode_texts(lm, prompts, completions, max_tokens)
    H = int(lm.model.config.hidden_size)
    feats = np.zeros((len(seqs), 2 * H), dtype=np.float32)
    trunks: list[torch.Tensor | None] = [None] * len(seqs)
    done = 0
    for idx in length_batches([len(s) for s in seqs], batch_size):
        if stop is not None and stop():
            raise Cancelled(f"feature extraction stopped after {done} of {len(seqs)} texts")
        batch = collate([seqs[i] for i in idx], [n_resp[i] for i in idx], lm.pad_token_id, lm.device)
        sink: list = []
        with lm.lock, torch.no_grad(), base_model_mode(lm.model):
            layer = _decoder(lm.model).layers[split_layer]
            with _capture_input(layer, sink, stop=False):
                h = final_hidden(lm.model, batch["input_ids"], batch["attention_mask"])
            f = pool_features(h, batch["attention_mask"], batch["response_mask"])
        feats[idx] = f.cpu().numpy()
        T = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            trunks[i] = sink[0][row, T - len(seqs[i]):].detach().to("cpu").clone()
        done += len(idx)
        if progress is not None:
            progress(done, len(seqs))
    return feats, trunks  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the model

def _pair(p) -> tuple[str, str, str, float]:
    if isinstance(p, dict):
        return p["prompt"], p["chosen"], p["rejected"], float(p.get("margin") or 0.0)
    if len(p) == 3:
        return p[0], p[1], p[2], 0.0
    prompt, chosen, rejected, margin = p
    return prompt, chosen, rejected, float(margin or 0.0)


class DeepRewardModel:
    """The deep tier's scorer: reward adapter `adapter_name` on lm.model plus a RewardHead.

    `DeepRewardModel(lm, config, adapter_name, probe)` creates a fresh adapter (or re-initialises one of the
    same name and shape), `DeepRewardModel.from_bytes(lm, b)` restores a saved one.
    """

    def __init__(self, lm, config: DeepRewardConfig | None = None, adapter_name: str = "reward", probe=None,
                 replace_adapter: bool = False):
        self.lm = lm
        self.config = config or DeepRewardConfig()
        self.adapter_name = adapter_name
        cfg = self.config
        self.num_layers = int(lm.model.config.num_hidden_layers)
        self.split = self.num_layers - min(int(cfg.lora_layers), self.num_layers) if cfg.lora_layers else 0
        if self.split and cfg.trunk_layer is not None:
            if not 0 < int(cfg.trunk_layer) <= self.split:
                raise ValueError(f"trunk_layer must be in 1..{self.split} (the first adapter layer)")
            self.split = int(cfg.trunk_layer)
        created = ensure_adapter(lm, adapter_name, cfg, replace=replace_adapter)
        if not created:
            self.reset_adapter()
        self.head = RewardHead(2 * int(lm.model.config.hidden_size)).to(lm.device)
        self.probe_head = RewardHead(2 * int(lm.model.config.hidden_size)).to(lm.device).requires_grad_(False)
        self.has_probe = False
        self.pairs_seen = 0
        self.updates = 0
        if probe is not None:
            self.set_probe(probe, reset_head=True)
        self._trunks: OrderedDict = OrderedDict()
        self._trunk_bytes = 0

    # ---------------------------------------------------------------- plumbing
    def adapter_parameters(self) -> list[nn.Parameter]:
        tag = f".{self.adapter_name}."
        return [p for n, p in self.lm.model.named_parameters() if "lora_" in n and tag in n]

    def active(self, trainable: bool = False):
        """Context: only the reward adapter active (see module docs); take lm.lock around it."""
        return only_adapter(self.lm.model, self.adapter_name, trainable, self.adapter_parameters())

    def reset_adapter(self) -> None:
        """Re-initialise the adapter (LoRA B = 0: the base model's hidden states again)."""
        with self.lm.lock, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            for m in _tuner_layers(self.lm.model):
                if self.adapter_name in getattr(m, "lora_A", {}):
                    m.reset_lora_parameters(self.adapter_name, True)

    def set_probe(self, probe, reset_head: bool | None = None) -> None:
        """Use a fast-tier probe (FastRewardModel or to_torch_head() tuple) as the frozen ensemble member and,
        if reset_head (default: only while this model is untrained), as the start of the trained head."""
        self.probe_head.load_probe(probe)
        self.has_probe = True
        if reset_head or (reset_head is None and self.updates == 0):
            self.head.load_probe(probe)

    @property
    def probe_weight(self) -> float:
        return float(self.config.probe_weight) if self.has_probe else 0.0

    # ---------------------------------------------------------------- trunk cache
    def _key(self, prompt: str, completion: str):
        return (self.config.max_tokens, prompt, completion)

    def _cache_put(self, key, value) -> None:
        budget = int(self.config.trunk_cache_mb) * 2 ** 20
        if budget <= 0 or not self.split:
            return
        size = value[2].numel() * value[2].element_size()
        if key in self._trunks:
            return
        self._trunks[key] = value
        self._trunk_bytes += size
        while self._trunk_bytes > budget and self._trunks:
            _, old = self._trunks.popitem(last=False)
            self._trunk_bytes -= old[2].numel() * old[2].element_size()

    def put_trunks(self, prompts: Sequence[str], completions: Sequence[str], trunks: Sequence[torch.Tensor]) -> None:
        """Seed the trunk cache with states from extract_features_and_trunks(split_layer=self.split)
        (self.split is config.trunk_layer, or the first adapter layer)."""
        if not self.split:
            raise ValueError("trunks are only used with config.lora_layers set")
        seqs, n_resp = encode_texts(self.lm, prompts, completions, self.config.max_tokens)
        for p, c, s, r, t in zip(prompts, completions, seqs, n_resp, trunks):
            if t.shape[0] != len(s):
                raise ValueError("a trunk does not match its text's token count (other max_tokens?)")
            self._cache_put(self._key(p, c), (s, r, t))

    def _trunk_batch(self, texts: Sequence[tuple[str, str]]) -> list[tuple[list[int], int, torch.Tensor]]:
        """(ids, n_resp, trunk [n, H]) per text, computing the missing ones in one base pass."""
        out: list = [None] * len(texts)
        missing = []
        for i, (p, c) in enumerate(texts):
            hit = self._trunks.get(self._key(p, c))
            if hit is not None:
                self._trunks.move_to_end(self._key(p, c))
                out[i] = hit
            else:
                missing.append(i)
        if missing:
            seqs, n_resp = encode_texts(self.lm, [texts[i][0] for i in missing], [texts[i][1] for i in missing],
                                        self.config.max_tokens)
            batch = collate(seqs, n_resp, self.lm.pad_token_id, self.lm.device)
            sink: list = []
            with self.lm.lock, torch.no_grad(), self.active(trainable=False):
                layer = _decoder(self.lm.model).layers[self.split]
                with _capture_input(layer, sink, stop=True):
                    try:
                        self.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=position_ids_from_mask(batch["attention_mask"]),
                                      logits_to_keep=1, use_cache=False)
                    except _Stop:
                        pass
            T = batch["input_ids"].shape[1]
            for row, i in enumerate(missing):
                val = (seqs[row], n_resp[row], sink[0][row, T - len(seqs[row]):].detach().clone())
                out[i] = val
                self._cache_put(self._key(*texts[i]), val)
        return out

    # ---------------------------------------------------------------- scoring
    def score_texts(self, texts: Sequence[tuple[str, str]], *, trainable: bool = False, ensemble: bool = True,
                    parts: bool = False):
        """Scores [B] (a tensor) of (prompt, completion) texts as ONE batch, row i for texts[i]: no length sorting,
        so a hook on `head` sees the rows in the caller's order (studio/reward_export.py reads them so).
        ensemble: (1 - probe_weight) * fine-tuned + probe_weight * probe on base features, as `score` gives;
        False: the fine-tuned head alone. parts: (fine-tuned, probe or None) instead of the mix.
        trainable: differentiable w.r.t. adapter and head (training); else wrap the call in torch.no_grad().
        Caller holds lm.lock (an RLock) when it wants forward and backward in one hold."""
        lm = self.lm
        w = self.probe_weight if ensemble else 0.0
        if self.split:
            items = self._trunk_batch(texts)
            T = max(len(s) for s, _, _ in items)
            H = items[0][2].shape[-1]
            trunk = torch.zeros((len(items), T, H), dtype=_model_dtype(lm), device=lm.device)
            for i, (s, _, t) in enumerate(items):
                trunk[i, :len(s)] = t.to(lm.device)
            b = collate([s for s, _, _ in items], [r for _, r, _ in items], lm.pad_token_id, lm.device,
                        side="right")
            with lm.lock, self.active(trainable=trainable):
                h = _top_hidden(lm.model, self.split, trunk, b["attention_mask"])
                f = pool_features(h, b["attention_mask"], b["response_mask"])
            if w:
                with lm.lock, torch.no_grad(), only_adapter(lm.model, None):
                    hb = _top_hidden(lm.model, self.split, trunk, b["attention_mask"])
                    fb = pool_features(hb, b["attention_mask"], b["response_mask"])
        else:
            seqs, n_resp = encode_texts(lm, [t[0] for t in texts], [t[1] for t in texts], self.config.max_tokens)
            b = collate(seqs, n_resp, lm.pad_token_id, lm.device, side="right")
            with lm.lock, self.active(trainable=trainable):
                h = final_hidden(lm.model, b["input_ids"], b["attention_mask"])
                f = pool_features(h, b["attention_mask"], b["response_mask"])
            if w:
                with lm.lock, torch.no_grad(), only_adapter(lm.model, None):
                    hb = final_hidden(lm.model, b["input_ids"], b["attention_mask"])
                    fb = pool_features(hb, b["attention_mask"], b["response_mask"])
        s = self.head(f)
        if parts:
            return s, (self.probe_head(fb) if w else None)
        if w:
            s = (1.0 - w) * s + w * self.probe_head(fb)
        return s

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 8,
              progress: Callable[[int, int], None] | None = None,
              stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Rewards [N] float32 of prompt+completion texts (lm.lock taken per batch):
        (1 - probe_weight) * fine-tuned + probe_weight * probe, see score_parts."""
        tuned, probe = self.score_parts(prompts, completions, batch_size, progress, stop)
        w = self.probe_weight
        return tuned if not w else ((1.0 - w) * tuned + w * probe).astype(np.float32)

    def score_parts(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 8,
                    progress: Callable[[int, int], None] | None = None,
                    stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(fine-tuned head on adapter features, probe on base features), each [N] float32; the probe part is
        zeros when the model has no probe."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs, _ = encode_texts(self.lm, prompts, completions, self.config.max_tokens)
        out = np.zeros(len(seqs), dtype=np.float32)
        out_probe = np.zeros(len(seqs), dtype=np.float32)
        done = 0
        for idx in length_batches([len(s) for s in seqs], batch_size):
            if stop is not None and stop():
                raise Cancelled(f"scoring stopped after {done} of {len(seqs)} texts")
            with torch.no_grad():
                s, sp = self.score_texts([(prompts[i], completions[i]) for i in idx], parts=True)
            out[idx] = s.float().cpu().numpy()
            if sp is not None:
                out_probe[idx] = sp.float().cpu().numpy()
            done += len(idx)
            if progress is not None:
                progress(done, len(seqs))
        return out, out_probe

    def score_batch(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, base_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] of already tokenised sequences (PPO), no grad: adapter forward, plus the probe on
        base_hidden (the base model's final hidden states; computed here if None and probe_weight > 0)."""
        w = self.probe_weight
        with self.lm.lock, torch.no_grad():
            with only_adapter(model, self.adapter_name, False, self.adapter_parameters()):
                h = final_hidden(model, input_ids, attention_mask)
            s = self.head(pool_features(h, attention_mask, response_mask))
            if w:
                if base_hidden is None:
                    with only_adapter(model, None):
                        base_hidden = final_hidden(model, input_ids, attention_mask)
                s = (1.0 - w) * s + w * self.probe_head(pool_features(base_hidden, attention_mask, response_mask))
            return s

    def reward_fn_for_ppo(self):
        """The PPO RewardFn of this model (uses_base_hidden=False); see ppo_reward."""
        from .ppo_reward import DeepRewardFn
        return DeepRewardFn(self)

    # ---------------------------------------------------------------- bytes
    def state_bytes(self) -> bytes:
        """safetensors bytes: the adapter's LoRA weights ("lora::<peft key>"), the head ("head::..."),
        and metadata (config, adapter name, base revision, counters)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save
        with self.lm.lock:
            sd = get_peft_model_state_dict(self.lm.model, adapter_name=self.adapter_name)
            tensors = {f"lora::{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
        for k, v in self.head.state_dict().items():
            tensors[f"head::{k}"] = v.detach().to("cpu", torch.float32).contiguous()
        if self.has_probe:
            for k, v in self.probe_head.state_dict().items():
                tensors[f"probe::{k}"] = v.detach().to("cpu", torch.float32).contiguous()
        meta = {"format": FORMAT, "version": VERSION, "adapter_name": self.adapter_name,
                "config": json.dumps(dataclasses.asdict(self.config)),
                "base_revision": str(getattr(self.lm, "revision", "")),
                "pairs_seen": str(self.pairs_seen), "updates": str(self.updates)}
        return save(tensors, metadata=meta)

    def load_state_bytes(self, b: bytes) -> None:
        """Load weights saved by state_bytes into this model (same adapter shape and base model)."""
        from peft import set_peft_model_state_dict
        tensors, meta = _read_state(b)
        rev = meta.get("base_revision", "")
        own = str(getattr(self.lm, "revision", ""))
        if rev and own and rev != own:
            raise ValueError(f"this reward model was trained on base model {rev}, but the loaded model is {own}")
        cfg = DeepRewardConfig.from_dict(json.loads(meta.get("config", "{}")))
        targets = _linear_names(self.lm.model)
        if not _same_lora(_lora_config(cfg, self.num_layers, targets),
                          _lora_config(self.config, self.num_layers, targets)):
            raise ValueError("the saved adapter has another shape (rank, alpha or layers) than this model")
        lora = {k[len("lora::"):]: v for k, v in tensors.items() if k.startswith("lora::")}
        head = {k[len("head::"):]: v for k, v in tensors.items() if k.startswith("head::")}
        probe = {k[len("probe::"):]: v for k, v in tensors.items() if k.startswith("probe::")}
        with self.lm.lock:
            params = self.adapter_parameters()
            grads = [(p, p.requires_grad) for p in params]
            res = set_peft_model_state_dict(self.lm.model, {k: v.to(self.lm.device) for k, v in lora.items()},
                                            adapter_name=self.adapter_name)
            for p, g in grads:
                p.requires_grad_(g)
        unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"the saved adapter does not fit this model ({len(unexpected)} unexpected tensors, "
                             f"e.g. {unexpected[0]})")
        self.head.load_state_dict({k: v.to(self.lm.device) for k, v in head.items()})
        self.has_probe = bool(probe)
        if probe:
            self.probe_head.load_state_dict({k: v.to(self.lm.device) for k, v in probe.items()})
        self.pairs_seen = int(meta.get("pairs_seen", 0))
        self.updates = int(meta.get("updates", 0))
        self._trunks.clear()
        self._trunk_bytes = 0

    @classmethod
    def from_bytes(cls, lm, b: bytes, adapter_name: str | None = None, replace_adapter: bool = False
                   ) -> "DeepRewardModel":
        """A scorer restored from state_bytes (adds the adapter to lm.model if it is not there)."""
        _, meta = _read_state(b)
        cfg = DeepRewardConfig.from_dict(json.loads(meta.get("config", "{}")))
        self = cls(lm, cfg, adapter_name or meta.get("adapter_name") or "reward", replace_adapter=replace_adapter)
        self.load_state_bytes(b)
        return self


def _read_state(b: bytes) -> tuple[dict, dict]:
    from safetensors.torch import load
    try:
        b = bytes(b)
        meta = safetensors_metadata(b)
        tensors = load(b)
    except Exception as e:
        raise ValueError(f"not a deep reward model: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a deep reward model (format {meta.get('format')!r})")
    return tensors, meta


# ------------------------------------------------------------------------------------------ training

class DeepRewardTrainer:
    """Incremental trainer of a DeepRewardModel.

    trainer = DeepRewardTrainer(lm, DeepRewardConfig(), adapter_name="reward", probe=fast_model)
    metrics = trainer.train(new_pairs, replay_pairs, progress=cb, stop=should_stop)
    blob = trainer.state_bytes()          # later: trainer.load_state_bytes(blob) warm-starts from it

    Pairs are (prompt, chosen, rejected, margin) tuples (margin may be None), 3-tuples or dicts.
    Each train() call builds a fresh AdamW (no optimizer state is kept between calls) and continues from
    the current adapter and head, so calling it after every few labels refines the model incrementally.
    """

    def __init__(self, lm, config: DeepRewardConfig | None = None, adapter_name: str = "reward", probe=None,
                 replace_adapter: bool = False):
        self.lm = lm
        self.config = config or DeepRewardConfig()
        self.model = DeepRewardModel(lm, self.config, adapter_name, probe, replace_adapter=replace_adapter)
        avoid_cudnn_attention(lm.device)

    @property
    def adapter_name(self) -> str:
        return self.model.adapter_name

    def set_probe(self, probe, reset_head: bool | None = None) -> None:
        self.model.set_probe(probe, reset_head)

    def score(self, prompts, completions, batch_size: int = 8, progress=None, stop=None) -> np.ndarray:
        return self.model.score(prompts, completions, batch_size, progress, stop)

    def state_bytes(self) -> bytes:
        return self.model.state_bytes()

    def reward_fn_for_ppo(self):
        return self.model.reward_fn_for_ppo()

    def load_state_bytes(self, b: bytes) -> None:
        self.model.load_state_bytes(b)

    def _plan(self, new: list, replay: list) -> tuple[list[list], int]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.model.updates])
        steps, n_replay = [], 0
        for _ in range(max(1, int(cfg.epochs))):
            items = list(new)
            k = min(len(replay), int(round(cfg.replay_ratio * len(new)))) if replay else 0
            if k:
                items += [replay[i] for i in rng.choice(len(replay), size=k, replace=False)]
                n_replay += k
            order = rng.permutation(len(items))
            items = [items[i] for i in order]
            bs = max(1, int(cfg.batch_size))
            steps += [items[i:i + bs] for i in range(0, len(items), bs)]
        return steps, n_replay

    def train(self, pairs_new: Iterable, pairs_replay: Iterable = (),
              progress: Callable[[int, int], None] | None = None,
              stop: Callable[[], bool] | None = None) -> dict:
        """Train on the new pairs plus sampled replay pairs; returns metrics.

        progress(step, total_steps) after each optimizer step; stop() returning True ends training after the
        current step (the model stays consistent; metrics["stopped"] is True).
        """
        cfg = self.config
        new = [_pair(p) for p in pairs_new]
        replay = [_pair(p) for p in pairs_replay]
        t0 = time.perf_counter()
        steps, n_replay = self._plan(new, replay)
        total = len(steps)
        params = self.model.adapter_parameters()
        head_params = [self.model.head.weight, self.model.head.bias]
        groups = [{"params": params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        base_lrs = [g["lr"] for g in opt.param_groups]
        warm = max(1, int(round(cfg.warmup_fraction * total))) if total > 1 else 0
        losses, correct, seen, stopped, done_steps, skipped = [], 0.0, 0, False, 0, 0
        for si, step_pairs in enumerate(steps):
            if stop is not None and stop():
                stopped = True
                break
            if si < warm:
                factor = (si + 1) / (warm + 1)
            else:
                prog = (si - warm) / max(1, total - warm)
                factor = cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * prog))
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            opt.zero_grad(set_to_none=True)
            mb = max(1, int(cfg.micro_batch_size))
            # The step's gradient is the sum over its pairs however they are split into micro-batches, so
            # split them by length (characters as a proxy for tokens): less padding in each forward.
            step_pairs = sorted(step_pairs, key=lambda q: len(q[0]) + max(len(q[1]), len(q[2])))
            for j in range(0, len(step_pairs), mb):
                micro = step_pairs[j:j + mb]
                texts = [(p, c) for p, c, _, _ in micro] + [(p, r) for p, _, r, _ in micro]
                margin = torch.tensor([m for *_, m in micro], dtype=torch.float32, device=self.lm.device)
                with self.lm.lock, torch.enable_grad(), self.model.active(trainable=True), \
                        fused_lora(self.lm.model):
                    s = self.model.score_texts(texts, trainable=True, ensemble=False)
                    sc, sr = s[:len(micro)], s[len(micro):]
                    loss = bt_loss(sc, sr, margin, reduction="sum") / len(step_pairs)
                    loss.backward()
                losses.append(float(loss.detach()) * len(step_pairs))
                d = (sc - sr).detach()
                correct += float(((d > 0).float() + 0.5 * (d == 0).float()).sum())
                seen += len(micro)
            norm = torch.nn.utils.clip_grad_norm_(params + head_params,
                                                  cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else math.inf)
            if not torch.isfinite(norm):
                skipped += 1          # a non-finite gradient would poison the weights: drop this step
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
            done_steps += 1
            if progress is not None:
                progress(done_steps, total)
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        self.model.updates += 1
        self.model.pairs_seen += len(new)
        return {"steps": done_steps, "total_steps": total, "pairs_new": len(new), "pairs_replay": n_replay,
                "pairs_trained": seen, "loss": float(np.sum(losses) / max(1, seen)),
                "accuracy": correct / max(1, seen), "seconds": time.perf_counter() - t0, "stopped": stopped,
                "skipped_steps": skipped}
