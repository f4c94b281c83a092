"""Parsers of preference files that users import: Anthropic HH-RLHF and TRL's prompt/chosen/rejected.

Both return a list of {"prompt": str, "chosen": str, "rejected": str}. Malformed input raises
PreferenceFormatError naming the line (JSONL, 1-based) or row (Parquet, 1-based) and the field.

HH-RLHF (JSONL, optionally gzip-compressed): each line {"chosen": dialogue, "rejected": dialogue}, dialogues
of the form "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt is the shared dialogue up to and including the
last "\\n\\nAssistant:" (the last one inside the part both texts share: a few real responses themselves contain
"\\n\\nAssistant:", which must not move the split); chosen/rejected are the texts after it, stripped.

TRL (JSONL or Parquet): columns prompt, chosen, rejected, either plain strings ("standard") or conversational
(lists of {"role", "content"} messages). Conversational prompt: the user turns joined by a blank line; a
multi-turn prompt that also holds assistant turns is written out HH-style ("\\n\\nHuman: ...\\n\\nAssistant:
...") so that no context is lost. Chosen/rejected: the assistant content. TRL's "implicit prompt" form
(no prompt column, chosen/rejected are whole conversations) is accepted for conversational data: the prompt is
the messages both share.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

HH_ASSISTANT = "\n\nAssistant:"


class PreferenceFormatError(ValueError):
    """A preference file is malformed; the message names the file position and the field."""

    def __init__(self, message: str, *, line: int | None = None, row: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.line, self.row, self.field = line, row, field


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _iter_jsonl(path: Path):
    """Yield (line_number, object) for the non-blank lines; bad JSON raises PreferenceFormatError."""
    try:
        with _open_text(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreferenceFormatError(f"{path.name}, line {i}: not valid JSON ({e.msg}, column {e.colno})",
                                                line=i) from None
                if not isinstance(obj, dict):
                    raise PreferenceFormatError(f"{path.name}, line {i}: expected a JSON object, "
                                                f"got {type(obj).__name__}", line=i)
                yield i, obj
    except UnicodeDecodeError as e:
        raise PreferenceFormatError(f"{path.name}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise PreferenceFormatError(f"{path.name}: could not be read ({e})") from None


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


def parse_hh(path) -> list[dict]:
    """Parse an HH-RLHF JSONL(.gz) file into [{"prompt", "chosen", "rejected"}]."""
    path = Path(path)
    out = []
    for i, obj in _iter_jsonl(path):
        for field in ("chosen", "rejected"):
            if field not in obj:
                raise PreferenceFormatError(f"{path.name}, line {i}: field {field!r} is missing", line=i, field=field)
            if not isinstance(obj[field], str):
                raise PreferenceFormatError(f"{path.name}, line {i}: field {field!r} must be a string, "
                                            f"got {type(obj[field]).__name__}", line=i, field=field)
        parts = split_hh(obj["chosen"], obj["rejected"])
        if parts is None:
            raise PreferenceFormatError(
                f"{path.name}, line {i}: fields 'chosen' and 'rejected' do not share a prompt ending in "
                f"'\\n\\nAssistant:'", line=i, field="rejected")
        out.append({"prompt": parts[0], "chosen": parts[1], "rejected": parts[2]})
    return out


# --------------------------------------------------------------------------------------------- TRL format

def _content_text(content, where: str, field: str, pos: dict) -> str:
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
                raise PreferenceFormatError(f"{where}: field {field!r} has a message content part that is "
                                            "not text", field=field, **pos)
        return "".join(texts)
    raise PreferenceFormatError(f"{where}: field {field!r} has a message whose 'content' is "
                                f"{type(content).__name__}, not a string", field=field, **pos)


def _messages(value, where: str, field: str, pos: dict) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        value = [value]
    if hasattr(value, "tolist"):   # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise PreferenceFormatError(f"{where}: field {field!r} must be a string or a list of messages, "
                                    f"got {type(value).__name__}", field=field, **pos)
    msgs = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PreferenceFormatError(f"{where}: field {field!r} must hold messages like "
                                        "{\"role\": ..., \"content\": ...}", field=field, **pos)
        if not isinstance(m["role"], str):
            raise PreferenceFormatError(f"{where}: field {field!r} has a message whose 'role' is not a string",
                                        field=field, **pos)
        msgs.append((m["role"], _content_text(m["content"], where, field, pos)))
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


def _trl_record(obj: dict, where: str, pos: dict) -> dict:
    for field in ("chosen", "rejected"):
        if field not in obj or obj[field] is None:
            raise PreferenceFormatError(f"{where}: field {field!r} is missing", field=field, **pos)
    prompt = obj.get("prompt")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if prompt is None:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise PreferenceFormatError(f"{where}: field 'prompt' is missing", field="prompt", **pos)
        cm = _messages(chosen, where, "chosen", pos)
        rm = _messages(rejected, where, "rejected", pos)
        k = 0
        while k < min(len(cm), len(rm)) and cm[k] == rm[k]:
            k += 1
        if k == 0:
            raise PreferenceFormatError(f"{where}: fields 'chosen' and 'rejected' share no prompt messages "
                                        "(and there is no 'prompt' field)", field="prompt", **pos)
        return {"prompt": _render_prompt(cm[:k]), "chosen": _response(cm[k:]), "rejected": _response(rm[k:])}
    if isinstance(prompt, str):
        p = prompt
    else:
        p = _render_prompt(_messages(prompt, where, "prompt", pos))
    out = {"prompt": p}
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            out[field] = value
        else:
            out[field] = _response(_messages(value, where, field, pos))
    return out


def parse_trl(path) -> list[dict]:
    """Parse a TRL preference file (JSONL, optionally gzipped, or Parquet) into [{"prompt", "chosen", "rejected"}]."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    out = []
    if magic == b"PAR1" or path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
            table = pq.read_table(path)
        except ImportError:
            raise
        except Exception as e:
            raise PreferenceFormatError(f"{path.name}: not a readable Parquet file ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        for field in ("chosen", "rejected"):
            if field not in table.column_names:
                raise PreferenceFormatError(f"{path.name}: column {field!r} is missing", field=field)
        for i, obj in enumerate(table.to_pylist(), 1):
            out.append(_trl_record(obj, f"{path.name}, row {i}", {"row": i}))
        return out
    for i, obj in _iter_jsonl(path):
        out.append(_trl_record(obj, f"{path.name}, line {i}", {"line": i}))
    return out
