"""Batched, streamed, seeded sampling of N completions for one prompt."""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .adapters import use_adapter
from .models import LoadedModel

MAX_N = 8


class GenerationError(ValueError):
    """Bad generation input; the message is meant for the user."""


@dataclass
class SamplingParams:
    n: int = 4                     # completions per prompt, 1..8, sampled in one batch
    max_new_tokens: int = 64       # response budget in tokens
    temperature: float = 0.8       # 0 means greedy decoding
    top_p: float = 0.95            # nucleus sampling mass
    seed: int | None = None        # fixed seed -> identical completions on the same machine

    def validate(self) -> None:
        def whole(v) -> bool:      # bool is an int in Python, but n=True is a slip, not 1
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool)
        if not whole(self.n) or not 1 <= self.n <= MAX_N:
            raise GenerationError(f"n must be between 1 and {MAX_N} completions per prompt, got {self.n!r}")
        if not whole(self.max_new_tokens) or not 1 <= self.max_new_tokens <= 4096:
            raise GenerationError(f"max_new_tokens must be between 1 and 4096, got {self.max_new_tokens!r}")
        if not number(self.temperature) or not 0 <= float(self.temperature) <= 5:
            raise GenerationError(f"temperature must be a number between 0 and 5, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < float(self.top_p) <= 1:
            raise GenerationError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not whole(self.seed) or not -2 ** 63 <= self.seed < 2 ** 63):
            raise GenerationError(f"seed must be a whole number that fits in 64 bits, or None, got {self.seed!r}")

    def as_dict(self) -> dict:
        return {"n": self.n, "max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "seed": self.seed}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "eos" | "length" | "stop" (the user stopped it early)
    latency_s: float
    token_ids: list[int] = field(default_factory=list, repr=False)


class _RowStreamer(BaseStreamer):
    """Receives one token per row per step from `generate` and reports the decoded texts so far."""

    def __init__(self, tokenizer, n: int, eos_id: int, on_update: Callable[[list[str]], None]):
        self.tok, self.eos_id, self.on_update = tokenizer, eos_id, on_update
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:       # the first call carries the prompt
            self._prompt_seen = True
            return
        for row, tid in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if tid == self.eos_id:
                self.done[row] = True
            else:
                self.ids[row].append(tid)
        self.on_update([self.tok.decode(ids, skip_special_tokens=True) for ids in self.ids])

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


def check_prompt(lm: LoadedModel, prompt: str, max_new_tokens: int) -> list[int]:
    """Token ids of the prompt, or a clear error if it is empty or does not fit the context."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError("the prompt is empty: type a question or instruction first")
    if "\x00" in prompt:
        raise GenerationError("the prompt contains a NUL character; remove it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"the prompt contains a character that is not valid Unicode at position {e.start} "
                              "(often left by a broken copy and paste); remove it") from None
    if len(prompt) > 64 * lm.context_length:     # refuse at once instead of tokenising megabytes
        raise GenerationError(f"the prompt is {len(prompt):,} characters, far beyond the model's context of "
                              f"{lm.context_length} tokens: shorten it")
    ids = lm.prompt_ids(prompt)
    if len(ids) + max_new_tokens > lm.context_length:
        raise GenerationError(f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                              f"exceeds the model's context of {lm.context_length} tokens: shorten it")
    return ids


def generate(lm: LoadedModel, prompt: str, params: SamplingParams | None = None, *,
             adapter: str | None = None, on_update: Callable[[list[str]], None] | None = None,
             stop: Callable[[], bool] | None = None) -> list[Generation]:
    """Sample `params.n` completions of `prompt` in one batch, optionally streaming partial texts."""
    params = params or SamplingParams()
    params.validate()
    prompt_ids = check_prompt(lm, prompt, params.max_new_tokens)
    device = lm.model.device if hasattr(lm.model, "device") else lm.device
    input_ids = torch.tensor([prompt_ids] * params.n, device=device)
    attention = torch.ones_like(input_ids)
    greedy = float(params.temperature) == 0.0
    kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                  pad_token_id=lm.pad_token_id, eos_token_id=lm.eos_token_id)
    if not greedy:
        kwargs.update(temperature=float(params.temperature), top_p=float(params.top_p), top_k=0)
    streamer = _RowStreamer(lm.tokenizer, params.n, lm.eos_token_id, on_update) if on_update else None
    criteria = StoppingCriteriaList([_StopWhen(stop)]) if stop else None
    with lm.lock, use_adapter(lm.model, adapter), torch.inference_mode():
        if params.seed is not None:
            torch.manual_seed(int(params.seed))
        t0 = time.perf_counter()
        out = lm.model.generate(input_ids=input_ids, attention_mask=attention, streamer=streamer,
                                stopping_criteria=criteria, **kwargs)
        latency = time.perf_counter() - t0
    stopped = bool(stop and stop())
    results = []
    for row in out[:, input_ids.shape[1]:].tolist():
        ids, reason = [], "length"
        for tid in row:
            if tid == lm.eos_token_id:
                reason = "eos"
                break
            if tid == lm.pad_token_id:
                break
            ids.append(tid)
        if reason == "length" and stopped and len(ids) < params.max_new_tokens:
            reason = "stop"
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        results.append(Generation(text=text, prompt_tokens=len(prompt_ids), completion_tokens=len(ids),
                                  finish_reason=reason, latency_s=latency, token_ids=ids))
    return results
