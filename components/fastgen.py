"""Fast rollout generation: one prefill, then one-token decode steps on a static KV cache (CUDA-graph replay on GPU).

    out = fast_generate(model, input_ids, attention_mask, max_new_tokens=128, temperature=1.0, top_p=1.0,
                        eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, return_logprobs=True)
    out.sequences        # [B, T + R] prompt (left-padded) + response, pad after EOS; R <= max_new_tokens
    out.response_mask    # [B, R] 1 up to and including the first EOS
    out.logprobs         # [B, R] log-softmax(logits / temperature) of the sampled tokens (0 after EOS)

What makes it fast (and what stays equal to `model.generate`):

* KV cache: one [B, H_kv, L, D] buffer per layer, L = T + max_new_tokens rounded up to a bucket (64), written in
  place at a slot index held in a device tensor (`_SlotCache`), so the decode step has static shapes and addresses.
* Attention mask: a full [B, 1, 1, L] mask buffer (bool for sdpa, additive for eager); the step sets the column of
  the slot it writes. Positions come from the cumsum of the prompt mask, as in `generate`, so a left-padded row sees
  the same positions as unpadded.
* Sampling inside the step by inverse CDF on pre-drawn uniforms (one `torch.rand` per call with the caller's
  generator): temperature, then top-p by sort + cumsum (kept iff the mass strictly before a token is < top_p, which
  is the rule of transformers' TopPLogitsWarper), static shapes, no RNG inside a CUDA graph. Greedy is argmax.
  Finished rows keep emitting pad; the loop stops when every row ended (checked every `sync_every` steps on CUDA).
* Repeated prompts (RLOO/GRPO sample k completions of each): the prefill runs each distinct prompt row (equal ids
  and mask) once and copies its KV slots and last logits to the rows that repeat it; the rows then sample apart,
  each with its own uniforms. CPU only (`dedupe_prefill=False` or DEDUPE_PREFILL = False runs every row);
  `out.info["prefill_rows"]` [B] says which distinct prompt each row is (None when every row ran), so a hook
  that saw the prefill's smaller batch can expand it.
* CUDA: the decode step (forward + sampling + state update) is captured once per (batch, L bucket, mode, adapter
  state) in a `torch.cuda.CUDAGraph` after a warm-up on a side stream, and replayed; graphs and buffers are kept
  by a `FastGenerator` (one per model, LRU of `max_graphs`). If capture fails the same step runs eagerly.
  Quantized (bitsandbytes) bases are not captured unless asked (`quantized_base`): their 8-bit matmul cannot be, and
  a failed capture breaks the process's CUDA random numbers.
* CPU: the decode steps multiply through oneDNN's packed weights (components/cpu_linear.py, `PACK_DECODE`): a few
  rows times every weight matrix is where torch's BLAS is slowest; the prefill keeps BLAS.
* LoRA (peft): for float base weights the active adapter is merged with `merge_adapter()` for the rollout and
  unmerged in a `finally` by restoring the touched base weights bit-exactly from a copy (merge + subtract in bf16
  would drift the frozen base a little on every rollout). Quantized (bitsandbytes) bases, DoRA-like variants and
  disabled adapters run unmerged (the LoRA layers are then part of the decode step).

Switch: `generate_rollouts(..., use_fast=False)` or RLHF_STUDIO_FASTGEN=0 falls back to `model.generate`.
Greedy outputs equal `model.generate(do_sample=False)`; sampled outputs follow the same distribution (not the same
draws: the random numbers are consumed differently).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .cpu_linear import packed_linears
from .model_utils import causal_lm_of

log = logging.getLogger(__name__)

ENV_SWITCH = "RLHF_STUDIO_FASTGEN"
LENGTH_BUCKET = 64
DEDUPE_PREFILL = True
"""Default of `dedupe_prefill`: the prefill runs each distinct prompt row once (module docs)."""


class FastGenUnsupported(RuntimeError):
    """The model cannot run on the fast path (the wrapper falls back to `model.generate`)."""


@dataclass
class FastGenOutput:
    sequences: torch.Tensor                 # [B, T + R] int64
    response_mask: torch.Tensor             # [B, R] int64, 1 up to and including the first EOS
    logprobs: torch.Tensor | None = None    # [B, R] float32, log p(token) at the sampling temperature
    prompt_length: int = 0                  # T
    has_eos: torch.Tensor | None = None     # [B] bool
    info: dict = field(default_factory=dict)  # path ("cuda_graph" | "eager" | "generate"), merged, bucket, ...

    @property
    def response_ids(self) -> torch.Tensor:  # [B, R]
        return self.sequences[:, self.prompt_length:]


def fast_path_enabled(use_fast: bool | None = None) -> bool:
    if use_fast is not None:
        return bool(use_fast)
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# ----------------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------------

def _forward_param_names(lm) -> set:
    import inspect
    try:
        return set(inspect.signature(lm.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_kwarg(module) -> str:
    """Name of a transformers forward's KV-cache argument: "cache" (newer releases) or "past_key_values"."""
    return "cache" if "cache" in _forward_param_names(module) else "past_key_values"


def _check_supported(lm, total_len: int) -> str:
    """Raise FastGenUnsupported for what the fast path does not model; returns the attention implementation."""
    cfg = lm.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise FastGenUnsupported("encoder-decoder models are not supported")
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise FastGenUnsupported(f"attention implementation {impl!r} (needs sdpa or eager: the fast path passes a "
                                 "4D mask)")
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layer_types = set(getattr(text_cfg, "layer_types", None) or ["full_attention"])
    window = getattr(text_cfg, "sliding_window", None)
    uses_window = "sliding_attention" in layer_types or (
        window is not None and bool(getattr(text_cfg, "use_sliding_window", True)))
    if layer_types - {"full_attention", "sliding_attention"}:
        raise FastGenUnsupported(f"layer types {sorted(layer_types)} (only attention layers are supported)")
    if uses_window and window is not None and total_len > int(window):
        raise FastGenUnsupported(f"sliding-window attention ({window}) shorter than the sequence ({total_len})")
    rope = getattr(text_cfg, "rope_scaling", None) or getattr(text_cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        raise FastGenUnsupported("dynamic rope scaling changes with the sequence length")
    return impl


def _cache_classes():
    try:
        from transformers.cache_utils import Cache, CacheLayerMixin
    except ImportError as e:  # pragma: no cover - very old or very new transformers
        raise FastGenUnsupported(f"transformers cache API not found ({e})") from None
    return Cache, CacheLayerMixin


_SLOT_CACHE = None


def _slot_cache_class():
    """`_SlotCache(n_layers)`: K/V buffers [B, H_kv, L, D] written in place at the slots in `cache.idx`."""
    global _SLOT_CACHE
    if _SLOT_CACHE is not None:
        return _SLOT_CACHE
    Cache, CacheLayerMixin = _cache_classes()

    class _SlotLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = max_len

        def lazy_initialization(self, key_states, value_states):
            b, h = key_states.shape[:2]
            self.keys = torch.zeros((b, h, self.max_len, key_states.shape[-1]), dtype=key_states.dtype,
                                    device=key_states.device)
            self.values = torch.zeros((b, value_states.shape[1], self.max_len, value_states.shape[-1]),
                                      dtype=value_states.dtype, device=value_states.device)
            self.is_initialized = True

        def update(self, key_states, value_states, idx=None, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys.index_copy_(2, idx, key_states)
            self.values.index_copy_(2, idx, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, *args, **kwargs):
            return self.max_len, 0

        def get_seq_length(self, *args, **kwargs):
            return self.max_len

        def get_max_length(self, *args, **kwargs):
            return self.max_len

        def get_max_cache_shape(self, *args, **kwargs):
            return self.max_len

    class _SlotCache(Cache):
        def __init__(self, n_layers: int, max_len: int):
            super().__init__(layers=[_SlotLayer(max_len) for _ in range(n_layers)])
            self.idx: torch.Tensor | None = None   # long [q]: the slots the current forward writes

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return self.layers[layer_idx].update(key_states, value_states, self.idx)

        def get_seq_length(self, layer_idx: int = 0, *args, **kwargs):
            return self.layers[0].max_len

        def get_mask_sizes(self, *args, **kwargs):
            return self.layers[0].max_len, 0

        def take_rows(self, src: "_SlotCache", rows: torch.Tensor, upto: int) -> None:
            """Slots 0..upto-1 of every row from row `rows[i]` of `src` (same layers and length; allocates this
            cache's buffers on first use, batch = len(rows))."""
            for dst, s in zip(self.layers, src.layers):
                keys = s.keys[:, :, :upto].index_select(0, rows)
                values = s.values[:, :, :upto].index_select(0, rows)
                if not dst.is_initialized:
                    dst.lazy_initialization(keys, values)
                dst.keys[:, :, :upto].copy_(keys)
                dst.values[:, :, :upto].copy_(values)

    _SLOT_CACHE = _SlotCache
    return _SlotCache


def _num_layers(lm) -> int:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise FastGenUnsupported("config has no num_hidden_layers")
    return int(n)


# ----------------------------------------------------------------------------------------------------------
# LoRA: merge for the rollout, restore exactly after
# ----------------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lora_layers(model) -> list:
    if not (hasattr(model, "peft_config") and hasattr(model, "merge_adapter")):
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_state(model, layers) -> tuple:
    """What the forward computes besides the base weights: active adapters, disabled or merged layers."""
    if not layers:
        return ()
    active = tuple(getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "")])
    disabled = any(getattr(m, "disable_adapters", False) for m in layers)
    merged = any(getattr(m, "merged", False) for m in layers)
    return active, disabled, merged


def _mergeable(model, layers) -> tuple[bool, str]:
    if not layers:
        return False, "no adapter"
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return False, "peft without LoRA"
    if _has_quantizer(causal_lm_of(model)) or _has_quantizer(model):
        return False, "quantized base"
    for m in layers:
        if not isinstance(m, LoraLayer):
            return False, f"non-LoRA tuner {type(m).__name__}"
        if getattr(m, "disable_adapters", False):
            return False, "adapters disabled"
        if getattr(m, "merged", False):
            return False, "already merged"
        if any(a in (getattr(m, "lora_variant", None) or {}) for a in m.active_adapters):
            return False, "LoRA variant (DoRA, ...)"
        base = m.get_base_layer()
        w = getattr(base, "weight", None)
        if w is None or w.dtype not in _FLOAT_DTYPES or type(base).__module__.startswith("bitsandbytes"):
            return False, "quantized base layer"
    return True, ""


@contextlib.contextmanager
def rollout_weights(model, merge: bool | None = None, exact_restore: bool = True):
    """Merge the active LoRA adapter into float base weights for the block (yields True if merged).

    `merge_adapter()` on entry. On exit, with exact_restore (default) the touched base weights are copied back
    from a snapshot taken before the merge and the layers are flagged unmerged, so that thousands of rollouts
    never drift the frozen base (merge + subtract in bf16 is not an identity); without it `unmerge_adapter()`.
    Memory: the snapshot is one copy of the adapted base weights, on their device.
    """
    layers = _lora_layers(model)
    ok, _why = _mergeable(model, layers)
    if merge is False or not ok:
        yield False
        return
    touched = []
    for m in layers:
        if any(a in m.lora_A for a in m.active_adapters):
            base = m.get_base_layer()
            touched.append(base.weight)
            if getattr(base, "bias", None) is not None:
                touched.append(base.bias)
    with torch.no_grad():
        snapshot = [t.detach().clone() for t in touched] if exact_restore else None
        merged = False
        try:
            try:
                model.merge_adapter()
                merged = True
            except ValueError as e:   # e.g. peft refuses some tied-weight merges: run unmerged
                log.info("fast generation: LoRA not merged (%s)", e)
            yield merged
        finally:
            if snapshot is not None:
                # unmerge by restoring the snapshot: exactly the weights before the merge (subtracting the delta
                # again, as `unmerge_adapter()` does, leaves bf16 rounding residue and costs one more pass)
                for m in layers:
                    getattr(m, "merged_adapters", []).clear()
                for t, s in zip(touched, snapshot):
                    t.data.copy_(s)
            elif any(getattr(m, "merged", False) for m in layers):
                try:
                    model.unmerge_adapter()
                finally:
                    for m in layers:   # never leave a layer flagged merged
                        getattr(m, "merged_adapters", []).clear()


# ----------------------------------------------------------------------------------------------------------
# Sampling (static shapes; no RNG: the uniforms are drawn before the loop)
# ----------------------------------------------------------------------------------------------------------

def select_tokens(logits: torch.Tensor, u: torch.Tensor | None, mode: str, temperature: torch.Tensor | float,
                  top_p: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] from float32 logits [B, V].

    mode "greedy": argmax (log-prob at temperature 1). "sample": inverse-CDF draw from softmax(logits / T) with
    uniforms u [B] in [0, 1). "top_p": the same restricted to the nucleus (tokens whose preceding mass in
    descending order is < top_p), renormalised. Log-probs are of the full temperature-scaled distribution.
    """
    if mode == "greedy":
        nxt = logits.argmax(-1, keepdim=True)
        lp = torch.log_softmax(logits, -1).gather(-1, nxt)
        return nxt.squeeze(-1), lp.squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if mode == "top_p":
        sp, order = probs.sort(-1, descending=True)
        cs = sp.cumsum(-1)
        sp = sp * ((cs - sp) < top_p)
        cs = sp.cumsum(-1)
        fallback = torch.zeros_like(cs[:, :1], dtype=torch.long)        # the most likely token
    elif mode == "sample":
        sp, order = probs, None
        cs = probs.cumsum(-1)
        fallback = probs.argmax(-1, keepdim=True)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    thr = (u.to(cs.dtype) * cs[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cs, thr, right=True).clamp_(max=cs.shape[-1] - 1)
    idx = torch.where(sp.gather(-1, idx) > 0, idx, fallback)    # rounding at the top end: never a zero-mass token
    nxt = order.gather(-1, idx) if order is not None else idx
    return nxt.squeeze(-1), logp.gather(-1, nxt).squeeze(-1)


def _mode(temperature: float, top_p: float) -> str:
    if temperature is None or float(temperature) <= 0:
        return "greedy"
    return "top_p" if float(top_p) < 1.0 else "sample"


# ----------------------------------------------------------------------------------------------------------
# Per-bucket state
# ----------------------------------------------------------------------------------------------------------

class _State:
    """Static buffers of one (batch, L bucket, mode, ...) bucket: KV cache, decode inputs, outputs, graph."""

    def __init__(self, lm, batch: int, max_len: int, mode: str, n_eos: int, device, mask_dtype, cache_kw: str,
                 keep_kw: bool):
        B, L = batch, max_len
        self.B, self.L, self.mode = B, L, mode
        self.cache = _slot_cache_class()(_num_layers(lm), L)
        self.lm_ref = weakref.ref(lm)
        self.cache_kw, self.keep_kw = cache_kw, keep_kw
        self.mask_dtype = mask_dtype
        self.on = True if mask_dtype == torch.bool else 0.0
        off = False if mask_dtype == torch.bool else torch.finfo(mask_dtype).min
        self.off = off
        z = dict(device=device)
        self.tok = torch.zeros((B, 1), dtype=torch.long, **z)
        self.pos = torch.zeros((B, 1), dtype=torch.long, **z)
        self.widx = torch.zeros((1,), dtype=torch.long, **z)
        self.step = torch.zeros((1,), dtype=torch.long, **z)
        self.done = torch.zeros((B,), dtype=torch.bool, **z)
        self.mask = torch.full((B, 1, 1, L), off, dtype=mask_dtype, **z)
        self.out_tok = torch.zeros((B, L), dtype=torch.long, **z)
        self.out_logp = torch.zeros((B, L), dtype=torch.float32, **z)
        self.unif = torch.zeros((L, B), dtype=torch.float32, **z)
        self.temp = torch.ones((), dtype=torch.float32, **z)
        self.top_p = torch.ones((), dtype=torch.float32, **z)
        self.pad = torch.zeros((), dtype=torch.long, **z)
        self.eos = torch.zeros((n_eos,), dtype=torch.long, **z)
        self.graph = None
        self.graph_failed = False

    def mutable(self):
        return [self.tok, self.pos, self.widx, self.step, self.done, self.mask, self.out_tok, self.out_logp]

    def forward(self, input_ids, mask, pos, cache=None) -> torch.Tensor:
        lm = self.lm_ref()
        kw = {self.cache_kw: self.cache if cache is None else cache, "use_cache": True}
        if self.keep_kw:
            kw["logits_to_keep"] = 1
        out = lm(input_ids=input_ids, attention_mask=mask, position_ids=pos, **kw)
        return out.logits[:, -1, :].float()

    def decode_step(self) -> None:
        """One token for every row; reads and writes only the static buffers (safe to capture)."""
        self.mask.index_fill_(3, self.widx, self.on)
        self.cache.idx = self.widx
        logits = self.forward(self.tok, self.mask, self.pos)
        u = self.unif.index_select(0, self.step).squeeze(0)
        nxt, lp = select_tokens(logits, u, self.mode, self.temp, self.top_p)
        nxt = torch.where(self.done, self.pad, nxt)
        lp = lp.masked_fill(self.done, 0.0)
        self.out_tok.index_copy_(1, self.step, nxt.unsqueeze(1))
        self.out_logp.index_copy_(1, self.step, lp.unsqueeze(1))
        self.done |= (nxt.unsqueeze(1) == self.eos.unsqueeze(0)).any(-1)
        self.tok.copy_(nxt.unsqueeze(1))
        self.pos.add_(1)
        self.widx.add_(1)
        self.step.add_(1)

    def capture(self) -> None:
        """Warm up on a side stream, then capture `decode_step` in a CUDA graph (state is restored after)."""
        snap = [t.clone() for t in self.mutable()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.decode_step()
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(self.mutable(), snap):
            t.copy_(v)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            self.decode_step()
        for t, v in zip(self.mutable(), snap):   # capture records, it does not run; restore anyway
            t.copy_(v)
        self.graph = g


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _has_quantizer(model) -> bool:
    """transformers loaded the model quantized (bitsandbytes or another hf_quantizer)."""
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


def quantized_base(lm) -> bool:
    """A bitsandbytes (or other hf_quantizer) base: its 8-bit matmul syncs with the host, so capture fails, and a
    failed capture leaves the default CUDA generator mid-capture ("Offset increment outside graph capture"), which
    breaks every later random draw of the process. Such bases decode eagerly unless use_cuda_graph=True."""
    return _has_quantizer(lm) or any(type(m).__module__.startswith("bitsandbytes") for m in lm.modules())


def _bucket(n: int, size: int) -> int:
    return int(math.ceil(n / size) * size)


def _response_mask(resp: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    is_eos = (resp.unsqueeze(-1) == eos.view(1, 1, -1)).any(-1)
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long(), is_eos.any(dim=1)


def distinct_rows(input_ids: torch.Tensor, mask2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows equal in ids and mask, [B, T] each -> (first [U]: the first row of each distinct prompt, in batch
    order; rows [B]: which of them each row repeats, an index into `first`)."""
    B = input_ids.shape[0]
    _, inverse = torch.unique(torch.cat([input_ids, mask2d.to(input_ids.dtype)], 1), dim=0, return_inverse=True)
    firsts = torch.full((int(inverse.max()) + 1,), B, dtype=torch.long, device=input_ids.device)
    firsts.scatter_reduce_(0, inverse, torch.arange(B, device=input_ids.device), "amin")
    order = firsts.argsort()                        # distinct prompts numbered by their first row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return firsts[order], rank[inverse]


def _prefill_mask(st: _State, mask2d: torch.Tensor, T: int) -> torch.Tensor:
    """[b, 1, T, L] attention mask of the prefill: causal over the prompt slots, padding hidden."""
    device, L, b = mask2d.device, st.L, mask2d.shape[0]
    q = torch.arange(T, device=device)
    k = torch.arange(L, device=device)
    allowed = (k.view(1, 1, L) <= q.view(1, T, 1)) & (k.view(1, 1, L) < T)
    allowed = allowed & torch.nn.functional.pad(mask2d.bool(), (0, L - T)).view(b, 1, L)
    allowed = allowed | (k.view(1, 1, L) == q.view(1, T, 1))    # pad queries see themselves: no NaN rows
    allowed = allowed.unsqueeze(1)                                # [b, 1, T, L]
    if st.mask_dtype == torch.bool:
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=st.mask_dtype, device=device),
                       torch.tensor(st.off, dtype=st.mask_dtype, device=device))


def _dedupes(asked: bool | None, device: torch.device, graph: bool, lm) -> bool:
    """Whether the prefill runs each distinct prompt once (`dedupe_prefill`, default DEDUPE_PREFILL).

    CPU only: the CUDA-graph path is left as it was (untested here; its prefill is a small part of a rollout).
    Not on quantized bases: bitsandbytes' 8-bit matmul picks its outlier columns over the whole batch, so a row's
    result depends on the other rows, and a smaller batch would change the numbers."""
    on = DEDUPE_PREFILL if asked is None else bool(asked)
    return on and device.type == "cpu" and not graph and not quantized_base(lm)


PACK_DECODE = True
"""CPU decode steps multiply through oneDNN's packed weights (components/cpu_linear.py); False: torch's BLAS."""

MIN_PACKED_DECODE_STEPS = 12
"""Fewest decode steps worth packing the weights for: packing them all costs about what ten or eleven decode steps
save (docs/INTERNALS.md, "Packed decode weights")."""

MIN_DEDUPE_PROMPT = 4
"""Shortest padded prompt whose prefill is deduplicated: MKL (torch's CPU BLAS) multiplies 1 to 3 rows with other
kernels than 4 or more, whose sums round differently; with >= 4 prompt tokens every trunk matmul of the prefill has
>= 4 rows either way (the output head runs on the B rows in both)."""


def _prefill(st: _State, input_ids: torch.Tensor, mask2d: torch.Tensor, T: int, dedupe: bool):
    """Run the prompt through the model, filling slots 0..T-1 of `st.cache` -> (last logits [B, V], rows).

    dedupe: each distinct prompt (RLOO/GRPO repeat a prompt k times) runs once through the trunk, into a cache of
    its own, whose slots are then copied to every row that repeats it; the output head runs on the B rows, as in
    the full prefill (a matmul of 1 to 3 rows rounds differently). rows [B] says which distinct prompt (in order
    of first appearance) each row is, None when every row ran (nothing repeats, dedupe off, short prompt). A
    row's prefill depends on its own tokens only, so the copies are what the full batch computes.
    """
    pos = (mask2d.cumsum(-1) - 1).clamp(min=0)
    q = torch.arange(T, device=input_ids.device)
    head = st.lm_ref().get_output_embeddings()
    if dedupe and T >= MIN_DEDUPE_PROMPT and head is not None:
        first, rows = distinct_rows(input_ids, mask2d)
        if len(first) < st.B:
            own = _slot_cache_class()(len(st.cache.layers), st.L)
            own.idx = q
            handle = head.register_forward_pre_hook(lambda _m, args: (args[0].index_select(0, rows),) + args[1:])
            try:
                logits = st.forward(input_ids[first], _prefill_mask(st, mask2d[first], T), pos[first], cache=own)
            finally:
                handle.remove()
            st.cache.take_rows(own, rows, T)
            if logits.shape[0] != st.B:    # a model that bypassed its head module's call: copy the logits
                logits = logits.index_select(0, rows)
            return logits, rows
    st.cache.idx = q
    return st.forward(input_ids, _prefill_mask(st, mask2d, T), pos), None


# ----------------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------------

class FastGenerator:
    """Fast generation for one model; keeps KV buffers and CUDA graphs across calls (LRU of `max_graphs`).

    A bucket is (L = T + max_new_tokens rounded up to `length_bucket`, batch, sampling mode, number of EOS ids,
    merged or not, adapter state, parameter addresses): a call whose prompts are shorter or longer reuses the
    graph of its bucket, or of a cached bucket up to twice as long (`_reusable_length`). `reset()` drops
    everything (frees the GPU memory).
    """

    def __init__(self, model, *, max_graphs: int = 2, length_bucket: int = LENGTH_BUCKET, sync_every: int = 8):
        self.model_ref = weakref.ref(model)
        self.max_graphs = max(1, int(max_graphs))
        self.length_bucket = max(1, int(length_bucket))
        self.sync_every = max(1, int(sync_every))
        self.capture_failure: str | None = None     # the first failed CUDA-graph capture, for the run's notes
        self._states: OrderedDict = OrderedDict()

    def reset(self) -> None:
        if self._states and torch.cuda.is_available():
            torch.cuda.synchronize()
        self._states.clear()

    def _reusable_length(self, shape: tuple, L: int) -> int:
        """The smallest cached bucket of this shape that holds L tokens, if it is at most twice L, else L.

        Prompt lengths vary from batch to batch (PPO over real prompts): a longer cached bucket serves a
        shorter call as it is (the prompt fills slots 0..T-1, the rest stays masked), so the calls share one
        captured graph instead of evicting each other's from the LRU and capturing again (~1 s each on a GPU).
        The cap bounds the waste: decode attention reads every slot of the bucket."""
        fits = [k[0] for k in self._states if k[1:] == shape and L <= k[0] <= 2 * L]
        return min(fits) if fits else L

    def _state(self, key, lm, B, L, mode, n_eos, device, mask_dtype) -> _State:
        st = self._states.get(key)
        if st is not None:
            self._states.move_to_end(key)
            return st
        while len(self._states) >= self.max_graphs:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._states.popitem(last=False)
        names = _forward_param_names(lm)
        st = _State(lm, B, L, mode, n_eos, device, mask_dtype, cache_kwarg(lm), "logits_to_keep" in names)
        self._states[key] = st
        return st

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, *,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id, pad_token_id: int,
                 generator: torch.Generator | None = None, use_cuda_graph: bool | None = None,
                 return_logprobs: bool = False, merge_lora: bool | None = None,
                 dedupe_prefill: bool | None = None) -> FastGenOutput:
        model = self.model_ref()
        if model is None:
            raise RuntimeError("the model of this FastGenerator was garbage-collected")
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, prompt_len] (left-padded)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B, T = input_ids.shape
        N = int(max_new_tokens)
        if N < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        eos_list = [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
        if int(pad_token_id) in eos_list:
            raise ValueError("the pad token must differ from EOS")
        lm = causal_lm_of(model)
        device = input_ids.device
        mask2d = attention_mask.to(device=device, dtype=torch.long)
        if bool((mask2d.sum(1) == 0).any()):
            raise ValueError("a row of the batch has no prompt token")
        L = _bucket(T + N, self.length_bucket)
        impl = _check_supported(lm, L)
        max_pos = getattr(lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config,
                          "max_position_embeddings", None)
        if max_pos is not None and int(mask2d.sum(1).max()) + N > int(max_pos):
            raise ValueError(f"prompt + max_new_tokens exceeds the model's context of {max_pos} tokens")
        mode = _mode(temperature, top_p)
        graph = _graphs_supported(device) and (use_cuda_graph is None or bool(use_cuda_graph))
        if graph and use_cuda_graph is None and quantized_base(lm):
            graph = False   # see quantized_base: a failed capture would break the process's CUDA RNG
        dedupe = _dedupes(dedupe_prefill, device, graph, lm)
        was_training = model.training
        model.eval()
        layers = _lora_layers(model)
        try:
            with rollout_weights(model, merge=merge_lora) as merged:
                fp = hash(tuple(p.data_ptr() for p in lm.parameters()))
                mask_dtype = torch.bool if impl == "sdpa" else lm.get_input_embeddings().weight.dtype
                if mask_dtype not in _FLOAT_DTYPES and mask_dtype != torch.bool:
                    mask_dtype = torch.float32
                shape = (B, mode, len(eos_list), str(device), graph, merged, _adapter_state(model, layers),
                         str(mask_dtype), fp)
                L = self._reusable_length(shape, L)
                st = self._state((L,) + shape, lm, B, L, mode, len(eos_list), device, mask_dtype)
                out_len, path, rows = self._run(st, input_ids.to(device), mask2d, N, T, float(temperature),
                                                float(top_p), eos_list, int(pad_token_id), generator, graph, dedupe)
                resp = st.out_tok[:, :out_len].clone()
                logp = st.out_logp[:, :out_len].clone() if return_logprobs else None
        finally:
            model.train(was_training)
        eos_t = st.eos.clone()
        rmask, has_eos = _response_mask(resp, eos_t)
        seq = torch.cat([input_ids.to(device), resp], dim=1)
        if logp is not None:
            logp = logp * rmask
        return FastGenOutput(sequences=seq, response_mask=rmask, logprobs=logp, prompt_length=T, has_eos=has_eos,
                             info={"path": path, "merged": bool(merged), "bucket": (B, L), "mode": mode,
                                   "steps": out_len, "prefill_rows": rows})

    def _run(self, st: _State, input_ids, mask2d, N, T, temperature, top_p, eos_list, pad, generator, graph,
             dedupe):
        device = input_ids.device
        B, L = st.B, st.L
        # per-call scalars and random numbers (drawn with the caller's generator, before the loop)
        st.temp.fill_(temperature if temperature > 0 else 1.0)
        st.top_p.fill_(top_p)
        st.pad.fill_(pad)
        st.eos.copy_(torch.tensor(eos_list, dtype=torch.long))
        if st.mode != "greedy":
            gdev = generator.device if generator is not None else device
            u = torch.rand((N, B), generator=generator, device=gdev, dtype=torch.float32)
            st.unif[:N].copy_(u.to(device))
        # prefill: the prompt through the model, writing slots 0..T-1
        real = mask2d.bool()
        logits, rows = _prefill(st, input_ids, mask2d, T, dedupe)
        nxt, lp = select_tokens(logits, st.unif[0], st.mode, st.temp, st.top_p)
        # decode state
        st.out_tok.zero_()
        st.out_logp.zero_()
        st.out_tok[:, 0] = nxt
        st.out_logp[:, 0] = lp
        st.done.copy_((nxt.unsqueeze(1) == st.eos.unsqueeze(0)).any(-1))
        st.tok.copy_(nxt.unsqueeze(1))
        st.pos.copy_(mask2d.sum(1, keepdim=True))
        st.widx.fill_(T)
        st.step.fill_(1)
        st.mask.fill_(st.off)
        st.mask[:, 0, 0, :T] = real if st.mask_dtype == torch.bool else torch.where(
            real, torch.zeros((), dtype=st.mask_dtype, device=device), torch.tensor(st.off, dtype=st.mask_dtype,
                                                                                    device=device))
        st.cache.idx = st.widx
        n_steps = N - 1
        path = "eager"
        if graph and n_steps > 0 and st.graph is None and not st.graph_failed:
            try:
                st.capture()
            except Exception as e:  # capture is best effort: the eager step computes the same thing
                st.graph_failed = True
                st.graph = None
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
                self.capture_failure = self.capture_failure or why
                log.warning("fast generation: CUDA graph capture failed (%s); decoding eagerly", why)
                torch.cuda.synchronize()
        use_graph = graph and st.graph is not None
        if use_graph:
            path = "cuda_graph"
        every = self.sync_every if graph else 1      # each check is a device sync on CUDA
        done_steps = 0
        all_done = bool(st.done.all())
        # the CPU's decode steps through oneDNN's packed weights (components/cpu_linear.py); not the prefill, whose
        # many rows BLAS multiplies well (and `_prefill`'s dedupe keeps its kernels)
        pack = PACK_DECODE and device.type == "cpu" and not all_done and n_steps >= MIN_PACKED_DECODE_STEPS
        with packed_linears(st.lm_ref(), B, enabled=pack):
            while done_steps < n_steps and not all_done:
                k = min(every, n_steps - done_steps)
                for _ in range(k):
                    if use_graph:
                        st.graph.replay()
                    else:
                        st.decode_step()
                done_steps += k
                all_done = bool(st.done.all())
        out_len = 1 + done_steps
        if all_done:   # stop where the last row ended, like generate
            is_eos = (st.out_tok[:, :out_len].unsqueeze(-1) == st.eos.view(1, 1, -1)).any(-1)
            out_len = int(is_eos.float().argmax(1).max()) + 1   # every row has an EOS here
        return out_len, path, rows


_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_fast_generator(model, **kwargs) -> FastGenerator:
    """The FastGenerator cached for `model` (created on first use)."""
    g = _GENERATORS.get(model)
    if g is None:
        g = FastGenerator(model, **kwargs)
        _GENERATORS[model] = g
    return g


def graph_capture_failure(model) -> str | None:
    """Why a CUDA-graph capture for `model` failed (its decoding then runs eagerly, slower), or None."""
    g = _GENERATORS.get(model)
    return g.capture_failure if g is not None else None


def release_fast_generators(model=None) -> None:
    """Drop cached graphs and KV buffers (of one model, or all)."""
    items = [model] if model is not None else list(_GENERATORS.keys())
    for m in items:
        g = _GENERATORS.pop(m, None)
        if g is not None:
            g.reset()


def fast_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, *,
                  temperature: float = 1.0, top_p: float = 1.0, eos_token_id, pad_token_id: int,
                  generator: torch.Generator | None = None, use_cuda_graph: bool | None = None,
                  return_logprobs: bool = False, merge_lora: bool | None = None,
                  dedupe_prefill: bool | None = None) -> FastGenOutput:
    """Generate with the fast path (see the module docstring); temperature 0 means greedy.

    input_ids / attention_mask [B, T] left-padded on the model's device. Uses the active adapter of a peft model.
    Graphs and buffers are cached per model (`release_fast_generators()` frees them).
    """
    return get_fast_generator(model).generate(
        input_ids, attention_mask, max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, generator=generator, use_cuda_graph=use_cuda_graph,
        return_logprobs=return_logprobs, merge_lora=merge_lora, dedupe_prefill=dedupe_prefill)


# ----------------------------------------------------------------------------------------------------------
# Plain `generate` (the fallback) and the wrapper
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def plain_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, *,
                   temperature: float = 1.0, top_p: float = 1.0, eos_token_id, pad_token_id: int,
                   generator: torch.Generator | None = None, return_logprobs: bool = False) -> FastGenOutput:
    """`model.generate` with a complete GenerationConfig (no top-k, nothing inherited), same output type.

    With a generator, the global RNG is seeded from it inside `fork_rng`, so the call is reproducible and leaves
    the global RNG state as it was.
    """
    from transformers import GenerationConfig
    greedy = temperature is None or float(temperature) <= 0
    eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else int(eos_token_id)
    common = dict(max_new_tokens=int(max_new_tokens), eos_token_id=eos, pad_token_id=int(pad_token_id),
                  return_dict_in_generate=True, output_logits=bool(return_logprobs))
    if greedy:
        cfg = GenerationConfig(do_sample=False, **common)
    else:
        cfg = GenerationConfig(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0, **common)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    device = input_ids.device
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=generator is not None):
            if generator is not None:
                seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg)
    finally:
        model.train(was_training)
    T = input_ids.shape[1]
    seq = out.sequences
    resp = seq[:, T:]
    eos_t = torch.tensor([eos] if isinstance(eos, int) else eos, device=seq.device)
    rmask, has_eos = _response_mask(resp, eos_t)
    logp = None
    if return_logprobs:
        logits = torch.stack(list(out.logits), dim=1).float()       # [B, R, V], before any processor
        scale = float(temperature) if not greedy else 1.0
        logp = torch.log_softmax(logits / scale, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1) * rmask
    return FastGenOutput(sequences=seq, response_mask=rmask, logprobs=logp, prompt_length=T, has_eos=has_eos,
                         info={"path": "generate", "merged": False, "steps": resp.shape[1]})


def left_pad(seqs: list, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids [B, T] int64, mask [B, T] int64)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError("empty prompt")
        ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def generate_rollouts(lm, prompt_ids_list: list, *, max_new_tokens: int, temperature: float = 1.0,
                      top_p: float = 1.0, generator: torch.Generator | None = None, return_logprobs: bool = False,
                      use_fast: bool | None = None, use_cuda_graph: bool | None = None, model=None,
                      eos_token_id=None, pad_token_id: int | None = None) -> FastGenOutput:
    """Sample one response per prompt (token-id lists) with `model` (default `lm.model`, active adapter used).

    lm: a LoadedModel (its tokenizer's EOS / pad ids are used unless given). Fast path by default;
    `use_fast=False` or RLHF_STUDIO_FASTGEN=0 uses `model.generate`; a model the fast path does not support
    falls back to `generate` too (logged). temperature 0 means greedy.
    """
    model = model if model is not None else lm.model
    eos = lm.eos_token_id if eos_token_id is None else eos_token_id
    pad = lm.pad_token_id if pad_token_id is None else pad_token_id
    try:
        device = next(causal_lm_of(model).parameters()).device
    except StopIteration:  # pragma: no cover
        device = getattr(lm, "device", torch.device("cpu"))
    if device.type == "meta":  # pragma: no cover
        device = lm.device
    ids, mask = left_pad(prompt_ids_list, pad, device=device)
    kw = dict(temperature=temperature, top_p=top_p, eos_token_id=eos, pad_token_id=pad, generator=generator,
              return_logprobs=return_logprobs)
    if fast_path_enabled(use_fast):
        try:
            return fast_generate(model, ids, mask, max_new_tokens, use_cuda_graph=use_cuda_graph, **kw)
        except FastGenUnsupported as e:
            log.warning("fast generation not supported for this model (%s); using model.generate", e)
    return plain_generate(model, ids, mask, max_new_tokens, **kw)
