"""Preference files: Anthropic HH-RLHF and TRL's prompt/chosen/rejected, read into {"prompt", "chosen", "rejected"}.

Malformed input raises FileFormatError naming the line (JSONL, 1-based) or row (Parquet, 1-based) and the field.

HH-RLHF (JSONL, optionally gzip-compressed): each line {"chosen": dialogue, "rejected": dialogue}, dialogues
of the form "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt is the shared dialogue up to and including the
last "\\n\\nAssistant:" (the last one inside the part both texts share: a few real responses themselves contain
"\\n\\nAssistant:", which must not move the split); chosen/rejected are the texts after it, stripped.

TRL (JSONL, optionally gzipped, or Parquet): columns prompt, chosen, rejected, either plain strings ("standard")
or conversational (lists of {"role", "content"} messages). Conversational prompt: the user turns joined by a
blank line; a multi-turn prompt that also holds assistant turns is written out HH-style ("\\n\\nHuman: ...
\\n\\nAssistant: ...") so that no context is lost. Chosen/rejected: the assistant content. TRL's "implicit
prompt" form (no prompt column, chosen/rejected are whole conversations) is accepted for conversational data:
the prompt is the messages both share.
"""

from __future__ import annotations

from .records import Position, existing_file, is_parquet, jsonl_records, parquet_records, read_records

HH_ASSISTANT = "\n\nAssistant:"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen_response, rejected_response) of an HH pair, or None if they share no prompt."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0 or cut + len(HH_ASSISTANT) > n:
        return None
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


# --------------------------------------------------------------------------------------------- TRL format

def _content_text(content, at: Position, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # multimodal-style parts: keep the text parts
        texts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise at.error(f"field {field!r} has a message content part that is "
                               "not text", field)
        return "".join(texts)
    raise at.error(f"field {field!r} has a message whose 'content' is "
                   f"{type(content).__name__}, not a string", field)


def _messages(value, at: Position, field: str) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        value = [value]
    if hasattr(value, "tolist"):   # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise at.error(f"field {field!r} must be a string or a list of messages, "
                       f"got {type(value).__name__}", field)
    msgs = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise at.error(f"field {field!r} must hold messages like "
                           "{\"role\": ..., \"content\": ...}", field)
        if not isinstance(m["role"], str):
            raise at.error(f"field {field!r} has a message whose 'role' is not a string", field)
        msgs.append((m["role"], _content_text(m["content"], at, field)))
    return msgs


def _render_prompt(msgs: list[tuple[str, str]]) -> str:
    turns = [(r, c) for r, c in msgs if r != "system"]
    if all(r == "user" for r, _ in turns):
        return "\n\n".join(c for _, c in turns)
    parts = []
    for r, c in turns:
        parts.append(("\n\nAssistant: " if r == "assistant" else "\n\nHuman: ") + c)
    return "".join(parts) + HH_ASSISTANT


def _response(msgs: list[tuple[str, str]]) -> str:
    texts = [c for r, c in msgs if r == "assistant"]
    if not texts:   # some files label the completion with another role; take all the content
        texts = [c for _, c in msgs]
    return "\n\n".join(texts)


def _trl_record(obj: dict, at: Position) -> dict:
    for field in ("chosen", "rejected"):
        if field not in obj or obj[field] is None:
            raise at.error(f"field {field!r} is missing", field)
    prompt = obj.get("prompt")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if prompt is None:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise at.error("field 'prompt' is missing", "prompt")
        cm = _messages(chosen, at, "chosen")
        rm = _messages(rejected, at, "rejected")
        k = 0
        while k < min(len(cm), len(rm)) and cm[k] == rm[k]:
            k += 1
        if k == 0:
            raise at.error("fields 'chosen' and 'rejected' share no prompt messages "
                           "(and there is no 'prompt' field)", "prompt")
        return {"prompt": _render_prompt(cm[:k]), "chosen": _response(cm[k:]), "rejected": _response(rm[k:])}
    if isinstance(prompt, str):
        p = prompt
    else:
        p = _render_prompt(_messages(prompt, at, "prompt"))
    out = {"prompt": p}
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            out[field] = value
        else:
            out[field] = _response(_messages(value, at, field))
    return out


def read_hh(path) -> list[dict]:
    """An HH-RLHF JSONL(.gz) file as [{"prompt", "chosen", "rejected"}]."""
    out = []
    for at, obj in read_records(path):
        for field in ("chosen", "rejected"):
            if field not in obj:
                raise at.error(f"field {field!r} is missing", field)
            if not isinstance(obj[field], str):
                raise at.error(f"field {field!r} must be a string, got {type(obj[field]).__name__}", field)
        parts = split_hh(obj["chosen"], obj["rejected"])
        if parts is None:
            raise at.error("fields 'chosen' and 'rejected' do not share a prompt ending in '\\n\\nAssistant:'",
                           "rejected")
        out.append({"prompt": parts[0], "chosen": parts[1], "rejected": parts[2]})
    return out


def read_trl(path) -> list[dict]:
    """A TRL preference file (JSONL, optionally gzipped, or Parquet) as [{"prompt", "chosen", "rejected"}]."""
    path = existing_file(path)
    records = (parquet_records(path, columns=("chosen", "rejected")) if is_parquet(path) else
               jsonl_records(path))
    return [_trl_record(obj, at) for at, obj in records]
