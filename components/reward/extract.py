"""Reward features of prompt+completion texts from the base model (adapters disabled).

One text is tokenised as: the prompt through the chat template (`lm.prompt_ids`), the completion's tokens, EOS.
It is truncated from the LEFT to `max_tokens`, keeping the end, since the end of the response matters most.
Texts are batched with left padding (position ids follow the attention mask, so a text's hidden states do not
depend on its batch), run through the model under `torch.inference_mode()`, and pooled with
`features.pool_features` from the final hidden states (`output_hidden_states=True`, last element: for llama
in transformers 5 that is after the final norm; `tests/test_reward_learning.py` checks it against the LM head).

Locking: `lm.lock` is taken for each batch only, so generation can interleave with a long extraction.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from ..model_utils import is_peft, position_ids_from_mask
from .features import pool_features


class Cancelled(RuntimeError):
    """A long reward computation was stopped by its `stop()` callback."""


@contextlib.contextmanager
def base_model_mode(model):
    """Run the base model: inside, a PeftModel has all its adapters disabled (peft's own context manager)."""
    if is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm) of whatever adapters are active on `model`.

    Only the last position's logits are computed (logits_to_keep=1): the LM head is not needed here.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def encode_texts(lm, prompts: Sequence[str], completions: Sequence[str], max_tokens: int = 256
                 ) -> tuple[list[list[int]], list[int]]:
    """Token ids (prompt via chat template + completion + EOS, left-truncated) and the response length of each."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    cache: dict[str, list[int]] = {}
    comp_ids = lm.tokenizer(list(completions), add_special_tokens=False)["input_ids"] if completions else []
    eos = lm.eos_token_id
    seqs, n_resp = [], []
    for p, c in zip(prompts, comp_ids):
        pids = cache.get(p)
        if pids is None:
            pids = cache[p] = list(lm.prompt_ids(p))
        resp = list(c) + [eos]
        ids = (pids + resp)[-max_tokens:]
        seqs.append(ids)
        n_resp.append(min(len(resp), len(ids)))
    return seqs, n_resp


def collate(seqs: Sequence[Sequence[int]], n_resp: Sequence[int], pad_id: int, device=None, side: str = "left"
            ) -> dict[str, torch.Tensor]:
    """Pad token id lists into input_ids / attention_mask / response_mask [B, T] (left padding by default).

    Right padding leaves no query row fully masked (pads come after the real tokens and attend to them), which
    keeps attention backward passes free of NaN; the deep tier trains that way. Real tokens see the same
    context and positions either way."""
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    am = torch.zeros((B, T), dtype=torch.long)
    rm = torch.zeros((B, T), dtype=torch.long)
    for i, (s, r) in enumerate(zip(seqs, n_resp)):
        n = len(s)
        a = T - n if side == "left" else 0
        ids[i, a:a + n] = torch.as_tensor(s, dtype=torch.long)
        am[i, a:a + n] = 1
        rm[i, a + n - r:a + n] = 1
    out = {"input_ids": ids, "attention_mask": am, "response_mask": rm}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def tokenize_pair_batch(lm, prompts: Sequence[str], completions: Sequence[str], max_tokens: int = 256
                        ) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / response_mask [B, T] (left padding, on lm.device) of prompt+completion texts.

    The same tokenisation as extract_features, for the deep tier and PPO to reuse.
    """
    seqs, n_resp = encode_texts(lm, prompts, completions, max_tokens)
    if not seqs:
        raise ValueError("no texts to tokenise")
    return collate(seqs, n_resp, lm.pad_token_id, lm.device)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def extract_features(lm, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 8,
                     max_tokens: int = 256, progress: Callable[[int, int], None] | None = None,
                     stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Pooled base-model features [N, 2*hidden] float32 of N prompt+completion texts, in input order.

    progress(done, total) is called after each batch; stop() returning True raises Cancelled before the next.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    seqs, n_resp = encode_texts(lm, prompts, completions, max_tokens)
    hidden_size = int(lm.model.config.hidden_size)
    out = np.zeros((len(seqs), 2 * hidden_size), dtype=np.float32)
    done = 0
    for idx in length_batches([len(s) for s in seqs], batch_size):
        if stop is not None and stop():
            raise Cancelled(f"feature extraction stopped after {done} of {len(seqs)} texts")
        batch = collate([seqs[i] for i in idx], [n_resp[i] for i in idx], lm.pad_token_id, lm.device)
        with lm.lock, torch.inference_mode(), base_model_mode(lm.model):
            h = final_hidden(lm.model, batch["input_ids"], batch["attention_mask"])
            f = pool_features(h, batch["attention_mask"], batch["response_mask"])
        out[idx] = f.cpu().numpy()
        done += len(idx)
        if progress is not None:
            progress(done, len(seqs))
    return out
