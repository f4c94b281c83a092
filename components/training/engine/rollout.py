"""Rollouts: batched sampling from the policy and the one forward pass that scores the sampled tokens.

Layout of a batch (B sequences):

    query_ids     [B, P]  left-padded prompt tokens (pad id != EOS), query_mask 1 on real tokens
    response_ids  [B, R]  sampled tokens, right-padded; R <= max_new_tokens (generation stops when all rows ended)
    response_mask [B, R]  1 up to and including the first EOS, 0 after it (tokens after EOS never count)

The token at response position t is predicted by the hidden state at sequence position P - 1 + t, so every
per-token quantity (log-prob, value, entropy) is computed from hidden[:, P-1 : P-1+R] only: the output head
(the full-vocabulary matmul) never runs over the prompt.

Training passes lay the batch out again, each row moved to column 0 (`_aligned_left`): the padding then sits
after every real token, where causal attention already hides it, so attention runs with no mask at all. A
mask makes SDPA take its slower masked kernel and builds a [B, heads, L, L] bias in every layer; and layers
compiled with that mask on an H100 ran no attention backward at all (docs/GPU.md, run 8), which the unmasked
layout does (run 9: FlashAttention's kernels, forward and backward).

Shared prompt prefix: prompts written with a chat template all begin with the same tokens (SmolLM2's system
prompt is ~24 of a ~37-token prompt). `forward_response` runs that common prefix once (batch 1), repeats its
key/value cache over the batch and runs only each row's remaining tokens on top of it. A prefix token's hidden
state depends only on the tokens before it and its position, so this is the same computation as the full batch
(rounding aside), gradients included: the backward pass sums the rows' gradients into the one prefix pass.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from ...attention import (PACKED, attention_implementation, prefix_sharing_supported, register_packed_attention,
                          varlen_available)
from ...fastgen import FastGenUnsupported, cache_kwarg, fast_generate, fast_path_enabled
from ...model_utils import causal_lm_of, position_ids_from_mask
from .ops import entropy_from_logits, logprobs_from_logits
from .tree import in_row_layout, scatter_rows, tree_hidden, tree_layout


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------

def encode_prompts(lm, prompts: list, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (chat template via `lm.prompt_ids`), left-truncated to `max_prompt_tokens`.

    A prompt may also be given as a list of token ids already (used by the GPU bench on random weights).
    Left truncation keeps the end of the prompt, where the chat template puts the assistant header.
    """
    out = []
    for p in prompts:
        ids = list(p) if isinstance(p, (list, tuple)) else list(lm.prompt_ids(p))
        if not ids:
            raise ValueError("empty prompt")
        out.append(ids[-max_prompt_tokens:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids [B, P] int64, mask [B, P] int64)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def mask_after_eos(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Response mask that keeps tokens up to and including the first EOS.

    response_ids [B, R] -> (mask [B, R] int64, has_eos [B] bool). Rows without EOS keep all R tokens
    (they were truncated at max_new_tokens; the trainer penalises them).
    """
    is_eos = response_ids == eos_id
    # number of EOS strictly before position t; a token is kept while none came before it
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (before == 0).long()
    return mask, is_eos.any(dim=1)


# ----------------------------------------------------------------------------------------------------------
# The batch
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One batch of sampled responses and what the forward passes computed for them (all on one device)."""
    query_ids: torch.Tensor        # [B, P] int64, left-padded
    query_mask: torch.Tensor       # [B, P] int64
    response_ids: torch.Tensor     # [B, R] int64, right-padded after EOS
    response_mask: torch.Tensor    # [B, R] int64, 1 up to and including the first EOS
    has_eos: torch.Tensor          # [B] bool
    prompts: list = field(default_factory=list)
    old_logp: torch.Tensor | None = None   # [B, R] float32, log pi_old(token) at the sampling temperature
    values: torch.Tensor | None = None     # [B, R] float32, value head at the state before each token
    entropy: torch.Tensor | None = None    # [B, R] float32, entropy of the sampling distribution

    @property
    def input_ids(self) -> torch.Tensor:        # [B, P + R]
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:   # [B, P + R]; tokens after EOS are masked out
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def full_response_mask(self) -> torch.Tensor:  # [B, P + R]; the reward protocol's response_mask
        return torch.cat([torch.zeros_like(self.query_mask), self.response_mask], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Forward pass over prompt + response
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ForwardOut:
    logp: torch.Tensor                      # [B, R] float32
    values: torch.Tensor | None = None      # [B, R] float32
    entropy: torch.Tensor | None = None     # [B, R] float32
    hidden: torch.Tensor | None = None      # [B, P + R, H] final hidden states (after the final norm)


MIN_SHARED_PREFIX = 8
"""Shortest common prompt prefix worth a separate pass (tokens)."""


def shared_prefix_length(query_ids: torch.Tensor, query_mask: torch.Tensor) -> int:
    """Number of leading tokens that every row's (left-padded) prompt shares, at most the shortest prompt's
    length - 1 so that each row keeps at least its last prompt token; 0 with fewer than 2 rows."""
    B, P = query_ids.shape
    if B < 2 or P < 2:
        return 0
    m = query_mask.long()
    if not (bool(m[:, -1].all()) and bool((m.diff(dim=1) >= 0).all())):
        return 0                                   # not left-padded: the rows' starts are unknown
    lens = m.sum(1)
    shortest = int(lens.min())
    if shortest < 2:
        return 0
    starts = (P - lens).unsqueeze(1) + torch.arange(shortest, device=query_ids.device)   # [B, shortest]
    heads = torch.gather(query_ids, 1, starts)
    same = (heads == heads[:1]).all(0)
    n = shortest if bool(same.all()) else int((~same).long().argmax())
    return min(n, shortest - 1)


def _decode_with_shared_prefix(decoder, query_ids, query_mask, response_ids, response_mask, n: int):
    """Final hidden states of the rows' own tokens, run on top of the common n-token prefix's cache.

    Returns (prefix hidden [1, n, H], hidden [B, W + R, H]) where the W = longest prompt - n query columns are
    each row's prompt after the prefix, left-aligned to the response like the full layout (masked before it);
    None if the model's cache cannot be repeated over the batch.
    """
    B, P = query_ids.shape
    lens = query_mask.long().sum(1)
    first = int(P - lens[0])
    prefix = query_ids[:1, first:first + n]
    pre = decoder(input_ids=prefix, position_ids=torch.arange(n, device=prefix.device).unsqueeze(0),
                  use_cache=True)
    cache = pre.cache if getattr(pre, "cache", None) is not None else pre.past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):
        return None                            # a cache type that cannot be repeated: the caller runs it all
    cache.batch_repeat_interleave(B)           # autograd sums the rows' gradients into the one prefix pass
    W = int(lens.max()) - n
    cols = torch.arange(P - W, P, device=query_ids.device)
    own = (cols.unsqueeze(0) >= (P - (lens - n)).unsqueeze(1)).to(query_mask.dtype)     # [B, W]
    tail_mask = torch.cat([own, response_mask.to(own.dtype)], dim=1)                      # [B, W + R]
    attention_mask = torch.cat([torch.ones_like(tail_mask[:, :1]).expand(B, n), tail_mask], dim=1)
    hidden = decoder(input_ids=torch.cat([query_ids[:, P - W:], response_ids], dim=1),
                     attention_mask=attention_mask, position_ids=n + position_ids_from_mask(tail_mask),
                     use_cache=True, **{cache_kwarg(decoder): cache}).last_hidden_state
    return pre.last_hidden_state, hidden


def forward_response(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, temperature: float, value_head: torch.nn.Module | None = None,
                     want_entropy: bool = False, want_hidden: bool = False,
                     entropy_grad: bool = False, share_prefix: bool = True, pack: bool = False,
                     prompt_lengths: list[int] | None = None, logprobs_fn=None) -> ForwardOut:
    """One trunk forward over prompt + response giving log-probs (and values, entropy, hidden) of the response.

    model: a CausalLM (or a PeftModel around one): whatever adapter is active (or disabled) is used.
    The output head runs on the R response-predicting positions only; log-probs use gather - logsumexp with
    the sampling temperature. Values are read from the same hidden states (shared trunk), in float32.
    Gradients flow when called outside no_grad (through the entropy only if entropy_grad).
    share_prefix: run a prompt prefix common to all rows once (module docs); off with gradient checkpointing,
    which cannot keep a cache.
    pack: True: where neither the shared prefix nor want_hidden applies, run the rows packed into one sequence
    with no padding (`_packed`; attention stays inside each row: components/attention.py). "tree": run the rows
    as a prompt tree (engine/tree.py: the shared prefix (unless share_prefix is off) and each distinct prompt
    once, no padding; outputs 0 after each row's end); the caller decides where it pays (`tree_rows_here`).
    prompt_lengths: the rows'
    prompt lengths on the host (query_mask's row sums), where the caller has them: packing then waits for nothing
    on the device. logprobs_fn: what turns the head's logits into log-probs (default `logprobs_from_logits`; the
    compiled PPO update passes its compiled version of it).
    """
    lm = causal_lm_of(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    P, R = query_ids.shape[1], response_ids.shape[1]
    if pack == "tree":
        return _tree_forward(lm, query_ids, query_mask, response_ids, response_mask, temperature, value_head,
                             want_entropy, want_hidden, entropy_grad, share_prefix, logprobs_fn)
    checkpointing = decoder.training and bool(getattr(decoder, "gradient_checkpointing", False))
    share_prefix = share_prefix and prefix_sharing_supported(decoder.config, P + R)
    n = shared_prefix_length(query_ids, query_mask) if share_prefix and not checkpointing else 0
    shared = _decode_with_shared_prefix(decoder, query_ids, query_mask, response_ids, response_mask, n) \
        if n >= MIN_SHARED_PREFIX else None
    if shared is not None:
        pre_hidden, tail = shared
        W = tail.shape[1] - R
        out = heads_on_hidden(head, tail[:, W - 1:W - 1 + R], response_ids, temperature, value_head,
                              want_entropy, entropy_grad, logprobs_fn, softcap=output_softcap(lm))
        if want_hidden:
            out.hidden = _full_layout(pre_hidden, tail, query_mask, R)
        return out
    if not want_hidden:
        if pack:
            # the rows' real tokens one after another, no padding (components/attention.py)
            input_ids, positions, cu_seqlens, predicting = _packed(query_ids, query_mask, response_ids,
                                                                   prompt_lengths)
            register_packed_attention()
            varlen_available(input_ids.device, decoder.get_input_embeddings().weight.dtype)   # probed once
            with attention_implementation(decoder.config, PACKED):
                hidden = decoder(input_ids=input_ids, position_ids=positions, use_cache=False,
                                 packed_cu_seqlens=cu_seqlens, packed_max_len=P + R).last_hidden_state
            h = hidden[0, predicting]                                                   # [B, R, H]
        else:
            # every row moved to column 0: padding only at the end, where causal attention keeps it out of
            # every real token's view, so no mask is needed (module docs)
            input_ids, predicting = _aligned_left(query_ids, query_mask, response_ids)
            hidden = decoder(input_ids=input_ids, position_ids=torch.arange(P + R, device=input_ids.device)[None],
                             use_cache=False).last_hidden_state
            h = hidden.gather(1, predicting.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return heads_on_hidden(head, h, response_ids, temperature, value_head, want_entropy, entropy_grad,
                               logprobs_fn, softcap=output_softcap(lm))
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    out = heads_on_hidden(head, hidden[:, P - 1:P - 1 + R], response_ids, temperature, value_head, want_entropy,
                          entropy_grad, logprobs_fn, softcap=output_softcap(lm))
    out.hidden = hidden
    return out


def _tree_forward(lm, query_ids, query_mask, response_ids, response_mask, temperature, value_head, want_entropy,
                  want_hidden, entropy_grad, share_prefix, logprobs_fn) -> ForwardOut:
    """forward_response on the prompt-tree layout: the head runs on the real response tokens only."""
    layout = tree_layout(query_ids, query_mask, response_mask, response_ids, share_prefix)
    hidden = tree_hidden(lm.get_decoder(), layout)
    real = heads_on_hidden(lm.get_output_embeddings(), hidden[:, layout.predicting],
                           response_ids[layout.rows, layout.cols][None], temperature, value_head, want_entropy,
                           entropy_grad, logprobs_fn, softcap=output_softcap(lm))
    shape = tuple(response_ids.shape)
    spread = lambda t: None if t is None else scatter_rows(t[0], layout, shape)     # noqa: E731
    return ForwardOut(logp=spread(real.logp), values=spread(real.values), entropy=spread(real.entropy),
                      hidden=in_row_layout(hidden, layout, query_mask, response_mask) if want_hidden else None)


def _aligned_left(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor):
    """The batch with each row's prompt and response starting at column 0.

    query_ids/query_mask [B, P] left-padded, response_ids [B, R] -> (ids [B, P + R]: row i holds its L_i prompt
    tokens, then its R response columns, then L_i filler tokens; predicting [B, R]: the column whose hidden
    state predicts each response token, L_i - 1 + t). The filler (copies of the row's last column) and the
    response's padding after EOS lie after every real token, so they change nothing before them.
    """
    B, P = query_ids.shape
    R = response_ids.shape[1]
    lens = query_mask.long().sum(1, keepdim=True)                                      # [B, 1]
    cols = torch.arange(P + R, device=query_ids.device).unsqueeze(0)                  # [1, P + R]
    source = (cols + (P - lens)).clamp(max=P + R - 1)                                  # [B, P + R]
    ids = torch.cat([query_ids, response_ids], dim=1).gather(1, source)
    return ids, lens - 1 + cols[:, :R]


def _packed(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
            prompt_lengths: list[int] | None = None):
    """The batch packed into one row without padding.

    query_ids/query_mask [B, P] left-padded, response_ids [B, R] -> (ids [1, T]: row i's L_i prompt tokens and
    its R response columns, rows one after another, T = sum(L_i) + B R; positions [1, T], from 0 in each row;
    cu_seqlens [B + 1] int32, where each row starts and the last ends; predicting [B, R]: the index in T of the
    hidden state that predicts each response token). prompt_lengths: the L_i on the host, if known; otherwise T
    is read back from the device, which waits for all the work queued before (a PPO micro-batch: the optimizer
    step).
    """
    B, P = query_ids.shape
    R = response_ids.shape[1]
    dev = query_ids.device
    lens = query_mask.long().sum(1)                                                    # [B]
    n = lens + R                                                                       # row lengths
    ends = n.cumsum(0)
    starts = ends - n
    T = sum(prompt_lengths) + B * R if prompt_lengths is not None else int(ends[-1])
    row = torch.repeat_interleave(torch.arange(B, device=dev), n, output_size=T)      # [T]: each token's row
    positions = torch.arange(T, device=dev) - starts[row]                              # [T]
    aligned, _ = _aligned_left(query_ids, query_mask, response_ids)                    # [B, P + R]
    ids = aligned[row, positions]
    predicting = (starts + lens - 1).unsqueeze(1) + torch.arange(R, device=dev)        # [B, R]
    cu_seqlens = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
    return ids[None], positions[None], cu_seqlens, predicting


def _full_layout(pre_hidden: torch.Tensor, tail: torch.Tensor, query_mask: torch.Tensor, R: int) -> torch.Tensor:
    """[B, P + R, H] hidden states in the batch's own layout from a shared-prefix pass (zeros at padding)."""
    B, P = query_mask.shape
    n = pre_hidden.shape[1]
    W = tail.shape[1] - R
    lens = query_mask.long().sum(1).tolist()
    full = tail.new_zeros((B, P + R, tail.shape[-1]))
    for i, ln in enumerate(lens):
        own = ln - n
        full[i, P - ln:P - own] = pre_hidden[0]
        full[i, P - own:] = tail[i, W - own:]
    return full


def heads_on_hidden(head: torch.nn.Module, h: torch.Tensor, response_ids: torch.Tensor, temperature: float,
                    value_head: torch.nn.Module | None = None, want_entropy: bool = False,
                    entropy_grad: bool = False, logprobs_fn=None, softcap: float | None = None) -> ForwardOut:
    """Output head and value head on the response-predicting hidden states h [B, R, H] -> ForwardOut.
    logprobs_fn(logits, labels, temperature): default `logprobs_from_logits`. softcap: the model's final logit
    softcapping (Gemma 2: logits = cap * tanh(logits / cap), before the temperature; `output_softcap`)."""
    if temperature != 1.0 and getattr(head, "bias", None) is None and not softcap:
        # head(h) / T == head(h / T) for a bias-free head; scaling h [B, R, H] instead of the logits
        # [B, R, V] saves a pass over V/H times more numbers, forward and backward
        h_scaled, temperature = h / temperature, 1.0
    else:
        h_scaled = h
    logits = head(h_scaled)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    out = ForwardOut(logp=(logprobs_fn or logprobs_from_logits)(logits, response_ids, temperature))
    if value_head is not None:
        out.values = value_head(h.to(value_head.weight.dtype)).squeeze(-1).float()
    if want_entropy:
        if entropy_grad:
            out.entropy = entropy_from_logits(logits, temperature)
        else:
            with torch.no_grad():
                out.entropy = entropy_from_logits(logits.detach(), temperature)
    return out


def output_softcap(model) -> float | None:
    """The final logit softcapping of a causal LM's config (Gemma 2), or None."""
    cfg = causal_lm_of(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "final_logit_softcapping", None) or None


def final_norm_module(model) -> torch.nn.Module | None:
    """The decoder's final norm (its output = the hidden states the output head reads), or None if unknown."""
    decoder = causal_lm_of(model).get_decoder()
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        m = getattr(decoder, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------

def generation_config(max_new_tokens: int, temperature: float, top_p: float, eos_id: int, pad_id: int,
                      greedy: bool = False):
    """A complete GenerationConfig, so nothing is inherited from the model's defaults (top-k is off)."""
    from transformers import GenerationConfig
    if greedy:
        return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                pad_token_id=pad_id)
    return GenerationConfig(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)


log = logging.getLogger(__name__)
# models the fast sampler refused (FastGenUnsupported), with its reason: they sample with `generate`
_FAST_UNSUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_sampling_unsupported(model) -> str | None:
    """Why the fast sampler refused `model` (which then samples with `model.generate`), or None."""
    return _FAST_UNSUPPORTED.get(model)


@torch.no_grad()
def sample(model, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           top_p: float, eos_id: int, pad_id: int, greedy: bool = False, capture_hidden: bool = False,
           merge_lora: bool = False):
    """Batched sampling with the active adapter -> response ids [B, R] (pad after EOS). Uses the global RNG.

    merge_lora=True: the fast sampler merges the active LoRA adapter into the base weights in place for the
    call and restores them exactly after (fastgen.rollout_weights); ignored by the `generate` fallback.

    capture_hidden=True returns (response ids, hidden [B, R, H] or None): the final-norm outputs that predicted
    each response token, recorded during generation (KV-cached, same weights as the sampling), so log-probs
    and values need no second trunk forward. None if they could not be recorded (unknown architecture).
    """
    if eos_id == pad_id:
        raise ValueError("the pad token must differ from EOS (see components.models._fix_padding)")
    # Hidden states are recorded by a hook on the final norm, which sees one call per sampled token in eager
    # decoding (either sampler on the CPU, or `generate`), but not inside a CUDA graph: there the trainer runs
    # its one policy forward instead.
    use_fast = fast_path_enabled() and model not in _FAST_UNSUPPORTED
    record = capture_hidden and not (use_fast and query_ids.is_cuda)
    store: list[torch.Tensor] = []
    handle = None
    if record:
        norm = final_norm_module(model)
        if norm is not None:
            def hook(_module, _inputs, output):
                h = output[0] if isinstance(output, tuple) else output
                store.append(h[:, -1:, :].detach())
            handle = norm.register_forward_hook(hook)
    was_training = model.training
    model.eval()   # dropout off while sampling
    try:
        out = None
        if use_fast:
            try:
                fast = fast_generate(model, query_ids, query_mask, max_new_tokens,
                                     temperature=0.0 if greedy else temperature, top_p=top_p, eos_token_id=eos_id,
                                     pad_token_id=pad_id, merge_lora=merge_lora)
                out, rows = fast.sequences, fast.info.get("prefill_rows")
                if store and rows is not None:   # the prefill ran each distinct prompt once: one row per row again
                    store[0] = store[0].index_select(0, rows)
            except FastGenUnsupported as e:     # refused before sampling anything: `generate` does it instead
                _FAST_UNSUPPORTED[model] = str(e)
                log.warning("fast sampling does not support this model (%s); sampling with model.generate", e)
                store.clear()
        if out is None:
            out = model.generate(input_ids=query_ids, attention_mask=query_mask,
                                 generation_config=generation_config(max_new_tokens, temperature, top_p, eos_id,
                                                                     pad_id, greedy))
    finally:
        model.train(was_training)
        if handle is not None:
            handle.remove()
    resp = out[:, query_ids.shape[1]:]
    if resp.shape[1] == 0:   # cannot happen with max_new_tokens >= 1, but keep shapes valid
        resp = torch.full((query_ids.shape[0], 1), eos_id, dtype=torch.long, device=query_ids.device)
    if not capture_hidden:
        return resp
    hidden = None
    if store and len(store) >= resp.shape[1] and all(h.shape[0] == resp.shape[0] for h in store):
        hidden = torch.cat(store[:resp.shape[1]], dim=1)
    return resp, hidden


@torch.no_grad()
def rollout(model, lm, prompts: list, *, max_prompt_tokens: int, max_new_tokens: int, temperature: float,
            top_p: float = 1.0, value_head: torch.nn.Module | None = None, score_tokens: bool = True,
            device=None) -> Rollout:
    """Sample one response per prompt and (score_tokens=True) compute old log-probs, values and entropy in one
    forward with the active adapter.

    model: the PeftModel (policy adapter active) or plain CausalLM; lm: the LoadedModel (tokenizer, ids).
    Tokens after the first EOS are masked out; prompts are left-truncated to max_prompt_tokens.
    """
    device = device or lm.device
    seqs = encode_prompts(lm, prompts, max_prompt_tokens)
    q, qm = left_pad(seqs, lm.pad_token_id, device)
    resp = sample(model, q, qm, max_new_tokens, temperature, top_p, lm.eos_token_id, lm.pad_token_id)
    rmask, has_eos = mask_after_eos(resp, lm.eos_token_id)
    resp = torch.where(rmask.bool(), resp, torch.full_like(resp, lm.pad_token_id))
    ro = Rollout(query_ids=q, query_mask=qm, response_ids=resp, response_mask=rmask, has_eos=has_eos,
                 prompts=list(prompts))
    if score_tokens:
        fo = forward_response(model, q, qm, resp, rmask, temperature, value_head=value_head, want_entropy=True)
        ro.old_logp, ro.values, ro.entropy = fo.logp, fo.values, fo.entropy
    return ro
