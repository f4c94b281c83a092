"""A studio reward model as a plain transformers sequence classifier (what TRL, OpenRLHF and verl load).

The folder holds the base model's architecture `<Arch>ForSequenceClassification` (no remote code): the base
weights (the deep tier's LoRA merged in), a `score` linear layer (no bias) read at the last non-pad token, and a
tokenizer whose chat template renders a (user prompt, assistant completion) conversation into exactly the
tokens the studio scores: the prompt through the model's own template with the generation prompt, the
completion, EOS (the original templates add text after EOS, e.g. ChatML's newline, which would move the last
token). The config's pad_token_id is the studio's pad token, which is not EOS (SmolLM2 ships pad == EOS: the
classifier would then skip the EOS and read the token before it).

What maps exactly and what does not:
- The studio's feature is [h_last, mean of h over the response] (features.pool_features). The classifier reads
  h_last only, so the last-token part of the head maps exactly (standardisation folded into the weights); the
  response-mean part, the head's bias and, for the deep tier, the probe mixed in on base-model features have no
  place in that architecture. They are distilled: a ridge fit of the remaining part of the studio's score on
  h_last over the studio's own completions (their scores, not their labels), starting from the exact part.
- `verify_export` reloads the folder through AutoModelForSequenceClassification and measures the largest score
  difference and the pairs ranked alike.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# A (user, assistant) conversation renders as the model's own prompt (generation prompt on) + completion + EOS.
_TEMPLATE = ("{%- if messages and messages[-1]['role'] == 'assistant' -%}"
             "{{- studio_prompt(messages[:-1], true) -}}{{- messages[-1]['content'] -}}{{- eos_token -}}"
             "{%- else -%}{{- studio_prompt(messages, add_generation_prompt) -}}{%- endif -%}")
_PLAIN = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ prefix }}{{ m['content'] }}"
          "{%- elif m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}{%- endif -%}{%- endfor -%}")

def export_chat_template(lm) -> str:
    """The saved tokenizer's chat template (see module docs)."""
    original = getattr(lm.tokenizer, "chat_template", None)
    if isinstance(original, dict):            # several named templates: the default one is used by the studio
        original = original.get("default")
    if original:
        return ("{% macro studio_prompt(messages, add_generation_prompt) %}" + original + "{% endmacro %}"
                + _TEMPLATE)
    # no chat template: the studio tokenises the bare prompt with the tokenizer's special tokens
    tok = lm.tokenizer
    ids = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id else ""
    return "{%- set prefix = " + json.dumps(bos) + " -%}" + _PLAIN

def texts_ids(tok, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
    """Token ids of (prompt, completion) conversations through `tok`'s chat template, as TRL feeds a reward model."""
    out = []
    for p, c in zip(prompts, completions):
        enc = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                      tokenize=True, return_dict=True)
        ids = enc["input_ids"]
        out.append(list(ids[0] if ids and isinstance(ids[0], list) else ids))
    return out

def _merge_lora(clf, peft_model, adapter_name: str) -> int:
    """Add the adapter's B A * scale into the classifier's copies of the same linear layers; returns how many."""
    mods = dict(clf.named_modules())
    n = 0
    for name, m in peft_model.named_modules():
        if adapter_name not in getattr(m, "lora_A", {}):
            continue
        target = mods.get(name.removeprefix("base_model.model."))
        if target is None:
            raise ValueError(f"cannot place the adapter's layer {name} in the exported model")
        a = m.lora_A[adapter_name].weight.detach().float().cpu()
        b = m.lora_B[adapter_name].weight.detach().float().cpu()
        with torch.no_grad():
            target.weight += (b @ a * float(m.scaling[adapter_name])).to(target.weight.dtype)
        n += 1
    return n

@torch.no_grad()
def last_hidden(clf, ids: Sequence[Sequence[int]], batch_size: int = 8) -> np.ndarray:
    """[N, H] float64: the hidden state the classifier's score layer reads (last token) for each text."""
    base = getattr(clf, clf.base_model_prefix)
    rows = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        T = max(len(s) for s in chunk)
        x = torch.zeros((len(chunk), T), dtype=torch.long)
        am = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, s in enumerate(chunk):             # right padding: positions as without padding
            x[r, :len(s)] = torch.as_tensor(s)
            am[r, :len(s)] = 1
        h = base(input_ids=x, attention_mask=am, use_cache=False).last_hidden_state
        last = am.sum(1) - 1
        rows.append(h[torch.arange(len(chunk)), last].double().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, int(clf.config.hidden_size)))

def fit_score_weight(X: np.ndarray, target: np.ndarray, w0: np.ndarray, ridge: float = 1e-4) -> np.ndarray:
    """w minimising |X w - target|^2 + lam |w - w0|^2, lam = ridge * mean diagonal of X^T X (scale-free).

    X [N, H] last-token states, target [N] the studio's scores, w0 [H] the exactly mapped last-token part."""
    X = np.asarray(X, dtype=np.float64)
    if len(X) == 0:
        return w0
    r = target - X @ w0
    lam = ridge * float((X ** 2).sum() / X.shape[1] / max(len(X), 1)) * len(X)
    # dual form (N x N) while there are fewer texts than features
    if len(X) <= X.shape[1]:
        alpha = np.linalg.solve(X @ X.T + lam * np.eye(len(X)), r)
        return w0 + X.T @ alpha
    return w0 + np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ r)

def write_export(lm, path: str | Path, exact_last_weight: np.ndarray, fit_prompts: Sequence[str],
                 fit_completions: Sequence[str], fit_scores: np.ndarray, adapter: tuple | None = None,
                 info: dict | None = None, ridge: float = 1e-4, last_states: np.ndarray | None = None) -> dict:
    """Write the classifier folder. exact_last_weight [H]: the head's last-token part in raw hidden units;
    fit_*: the studio's completions and its scores of them (for the distilled part); adapter: (peft model,
    adapter name) to merge; last_states [N, H]: the fit texts' last-token states where the caller has them
    (the fast tier's features begin with them). Returns what was written (also saved as studio_export.json)."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _export_tokenizer(lm)
    clf = base_classifier(lm)
    merged = _merge_lora(clf, *adapter) if adapter else 0
    X = last_hidden(clf, texts_ids(tok, fit_prompts, fit_completions)) if last_states is None else \
        np.asarray(last_states, dtype=np.float64)
    w = fit_score_weight(X, np.asarray(fit_scores, dtype=np.float64), np.asarray(exact_last_weight, np.float64),
                         ridge)
    with torch.no_grad():
        clf.score.weight.copy_(torch.as_tensor(w, dtype=torch.float32)[None, :])
    clf.config.pad_token_id = lm.pad_token_id
    clf.config.id2label, clf.config.label2id = {0: "reward"}, {"reward": 0}
    clf.save_pretrained(path)
    tok.save_pretrained(path)
    fitted = X @ w
    meta = dict(info or {}, lora_layers_merged=merged, texts_fitted=len(X),
                fit_max_abs_diff=float(np.abs(fitted - fit_scores).max()) if len(X) else 0.0,
                pad_token_id=lm.pad_token_id, eos_token_id=lm.eos_token_id)
    (path / "studio_export.json").write_text(json.dumps(meta, indent=2))
    return meta

def base_classifier(lm):
    """`<Arch>ForSequenceClassification` holding the loaded base model's weights in fp32, score layer at zero.

    Copied from the model in memory (its adapters left out, wrapped layers unwrapped), which also skips a
    random initialisation; a 4/8-bit base is read again from its folder in full precision instead."""
    from transformers import AutoModelForSequenceClassification
    from ..model_utils import is_peft
    src = lm.model.get_base_model() if is_peft(lm.model) else lm.model
    if lm.quantization:
        return _classifier_from_folder(lm)
    cfg = copy.deepcopy(src.config)
    cfg.num_labels, cfg.pad_token_id = 1, lm.pad_token_id
    with torch.device("meta"):
        clf = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    clf.to_empty(device="cpu")
    prefix = clf.base_model_prefix
    unwrap = lambda name: name.replace(".base_layer.", ".")  # noqa: E731  (peft's wrapped linear layers)
    source = {unwrap(n): t for n, t in getattr(src, prefix).named_parameters() if "lora_" not in n}
    source.update((unwrap(n), t) for n, t in getattr(src, prefix).named_buffers())
    targets = dict(getattr(clf, prefix).named_parameters())
    targets.update(getattr(clf, prefix).named_buffers())
    if set(targets) - set(source):
        raise ValueError(f"the loaded model lacks {sorted(set(targets) - set(source))[:3]} for the classifier")
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(source[name].detach().to("cpu", t.dtype))
        clf.score.weight.zero_()
    return clf.eval()


def _classifier_from_folder(lm):
    """Same, read from the model's folder (tied embeddings are stored under the LM head's name there)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    causal = AutoModelForCausalLM.from_pretrained(lm.source_path, dtype=torch.float32)
    cfg = causal.config
    cfg.num_labels, cfg.pad_token_id = 1, lm.pad_token_id
    clf = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    prefix = clf.base_model_prefix
    getattr(clf, prefix).load_state_dict(getattr(causal, prefix).state_dict())
    with torch.no_grad():
        clf.score.weight.zero_()
    return clf.eval()


def _export_tokenizer(lm):
    tok = copy.deepcopy(lm.tokenizer)
    tok.chat_template = export_chat_template(lm)
    tok.padding_side = "right"            # the classifier takes positions 0.. from the start of the row
    tok.truncation_side = "left"          # the studio keeps the end of a long text
    return tok

@torch.no_grad()
def verify_export(path: str | Path, prompts: Sequence[str], completions: Sequence[str],
                  studio_scores: np.ndarray, pairs: Sequence[tuple[int, int]] = (),
                  batch_size: int = 8) -> dict:
    """Load the folder as another engine would and compare: largest |score difference| over the texts and how
    many pairs (indices into the texts) it ranks as the studio does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    clf = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = texts_ids(tok, prompts, completions)
    scores = []
    for i in range(0, len(ids), batch_size):
        batch = tok.pad({"input_ids": ids[i:i + batch_size]}, return_tensors="pt")
        scores.append(clf(**batch).logits[:, 0].double().numpy())
    got = np.concatenate(scores) if scores else np.zeros(0)
    want = np.asarray(studio_scores, dtype=np.float64)
    same = sum(int(np.sign(got[a] - got[b]) == np.sign(want[a] - want[b])) for a, b in pairs)
    return {"scores": got, "max_abs_diff": float(np.abs(got - want).max()) if len(got) else 0.0,
            "pairs": len(pairs), "pairs_ranked_alike": same}
