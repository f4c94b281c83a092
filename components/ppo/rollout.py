"""Rollouts: batched sampling from the policy and the one forward pass that scores the sampled tokens.

Layout of a batch (B sequences):

    query_ids     [B, P]  left-padded prompt tokens (pad id != EOS), query_mask 1 on real tokens
    response_ids  [B, R]  sampled tokens, right-padded; R <= max_new_tokens (generation stops when all rows ended)
    response_mask [B, R]  1 up to and including the first EOS, 0 after it (tokens after EOS never count)

The token at response position t is predicted by the hidden state at sequence position P - 1 + t, so every
per-token quantity (log-prob, value, entropy) is computed from hidden[:, P-1 : P-1+R] only: the output head
(the full-vocabulary matmul) never runs over the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import os

import torch

from .core import entropy_from_logits, logprobs_from_logits


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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

    @property
    def response_lengths(self) -> torch.Tensor:  # [B]
        return self.response_mask.sum(1)


# ----------------------------------------------------------------------------------------------------------
# Forward pass over prompt + response
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ForwardOut:
    logp: torch.Tensor                      # [B, R] float32
    values: torch.Tensor | None = None      # [B, R] float32
    entropy: torch.Tensor | None = None     # [B, R] float32
    hidden: torch.Tensor | None = None      # [B, P + R, H] final hidden states (after the final norm)


def causal_lm_of(model) -> torch.nn.Module:
    """The transformers CausalLM inside a peft PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_response(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, temperature: float, value_head: torch.nn.Module | None = None,
                     want_entropy: bool = False, want_hidden: bool = False,
                     entropy_grad: bool = False) -> ForwardOut:
    """One trunk forward over prompt + response giving log-probs (and values, entropy, hidden) of the response.

    model: a CausalLM (or a PeftModel around one): whatever adapter is active (or disabled) is used.
    The output head runs on the R response-predicting positions only; log-probs use gather - logsumexp with
    the sampling temperature. Values are read from the same hidden states (shared trunk), in float32.
    Gradients flow when called outside no_grad (through the entropy only if entropy_grad).
    """
    lm = causal_lm_of(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    P, R = query_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    out = heads_on_hidden(head, hidden[:, P - 1:P - 1 + R], response_ids, temperature, value_head, want_entropy,
                          entropy_grad)
    if want_hidden:
        out.hidden = hidden
    return out


def heads_on_hidden(head: torch.nn.Module, h: torch.Tensor, response_ids: torch.Tensor, temperature: float,
                    value_head: torch.nn.Module | None = None, want_entropy: bool = False,
                    entropy_grad: bool = False) -> ForwardOut:
    """Output head and value head on the response-predicting hidden states h [B, R, H] -> ForwardOut."""
    logits = head(h)
    out = ForwardOut(logp=logprobs_from_logits(logits, response_ids, temperature))
    if value_head is not None:
        out.values = value_head(h.to(value_head.weight.dtype)).squeeze(-1).float()
    if want_entropy:
        if entropy_grad:
            out.entropy = entropy_from_logits(logits, temperature)
        else:
            with torch.no_grad():
                out.entropy = entropy_from_logits(logits.detach(), temperature)
    return out


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


@torch.no_grad()
def sample(model, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           top_p: float, eos_id: int, pad_id: int, greedy: bool = False, capture_hidden: bool = False):
    """Batched sampling with the active adapter -> response ids [B, R] (pad after EOS). Uses the global RNG.

    capture_hidden=True returns (response ids, hidden [B, R, H] or None): the final-norm outputs that predicted
    each response token, recorded during generation (KV-cached, same weights as the sampling), so log-probs
    and values need no second trunk forward. None if they could not be recorded (unknown architecture).
    """
    if eos_id == pad_id:
        raise ValueError("the pad token must differ from EOS (see components.models._fix_padding)")
    # The fast sampler (components/fastgen.py: static KV cache; CUDA-graph decode on GPU) is the default on every
    # device; RLHF_STUDIO_FASTGEN=0 falls back to `model.generate`. Hidden states are recorded by a hook on the
    # final norm, which sees one call per sampled token in eager decoding (either sampler on the CPU, or
    # `generate`), but not inside a CUDA graph: there the trainer runs its one policy forward instead.
    use_fast = os.environ.get("RLHF_STUDIO_FASTGEN", "1") != "0"
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
        if use_fast:
            from ..fastgen import fast_generate
            out = fast_generate(model, query_ids, query_mask, max_new_tokens,
                                temperature=0.0 if greedy else temperature, top_p=top_p, eos_token_id=eos_id,
                                pad_token_id=pad_id, merge_lora=False).sequences
        else:
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
