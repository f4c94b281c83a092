"""Checks of values handed to the store: each returns the clean value or raises InvalidInput saying what is wrong."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import InvalidInput

FEEDBACK_KINDS = ("stars", "thumbs", "pairwise", "ranking", "critique", "rewrite")
WINNERS = ("a", "b", "tie", "both_bad")
FEEDBACK_COLS = ("kind", "criterion", "prompt_id", "completion_id", "other_completion_id", "stars", "up",
                 "winner", "ranking", "text", "tags", "rewrite_completion_id", "annotator", "session_id",
                 "idempotency_key", "source")
# which optional label fields each kind accepts (completion_id/prompt_id/meta are handled separately)
_KIND_FIELDS = {
    "stars": {"stars"},
    "thumbs": {"up", "tags"},
    "pairwise": {"other_completion_id", "winner"},
    "ranking": {"ranking"},
    "critique": {"text"},
    "rewrite": {"rewrite_text"},
}
_META_FIELDS = {"kind", "criterion", "prompt_id", "completion_id", "annotator", "session_id", "idempotency_key",
                "source"}


def as_int(v: Any, name: str, *, optional: bool = False, minimum: int | None = None) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise InvalidInput(f"{name} must be an integer, got {v!r}.")
    v = int(v)
    if not -2 ** 63 <= v < 2 ** 63:      # DuckDB's BIGINT; beyond it the query fails with an INT128 error
        raise InvalidInput(f"{name} is out of range, got {v}.")
    if minimum is not None and v < minimum:
        raise InvalidInput(f"{name} must be at least {minimum}, got {v}.")
    return v


def as_float(v: Any, name: str, *, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"{name} must be a number, got {v!r}.")
    return float(v)


def as_str(v: Any, name: str, *, optional: bool = False, nonempty: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise InvalidInput(f"{name} must be text, got {type(v).__name__}.")
    if nonempty and not v.strip():
        raise InvalidInput(f"{name} must not be empty.")
    return v


def as_bytes(v: Any, name: str) -> bytes:
    if isinstance(v, (bytearray, memoryview)):
        v = bytes(v)
    if not isinstance(v, bytes):
        raise InvalidInput(f"{name} must be bytes, got {type(v).__name__}.")
    return v


def as_ids(values: Iterable[Any], name: str) -> list[int]:
    return [as_int(v, name) for v in values]


def valid_unicode(text: str, where: str) -> str:
    """Text that can be stored and hashed: a lone UTF-16 surrogate (a "\\ud800" escape in scraped JSON) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{where} contains a character that is not valid Unicode at position {e.start} "
                           "(a lone surrogate); fix or drop that row.") from None
    return text


def clean_prompt(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"{where} must be text, got {type(text).__name__}.")
    if not text.strip():
        raise InvalidInput(f"{where} is empty.")
    return valid_unicode(text, where).strip()


def criterion_name(name: Any) -> str:
    """1 to 64 letters (any script), digits, spaces, '-' or '_' (surrounding spaces are dropped)."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64 or \
            not all(ch.isalnum() or ch in " -_" for ch in name.strip()):
        raise InvalidInput(f"Invalid criterion name {name!r}: use 1 to 64 letters, digits, spaces, '-' or '_'.")
    return name.strip()


def import_source(source: Any) -> str:
    source = as_str(source, "source").strip()
    return source if source.startswith("import:") else f"import:{source}"


def normalise_feedback(fields: Mapping[str, Any], kinds: Sequence[str] = FEEDBACK_KINDS) -> dict[str, Any]:
    """One label's fields checked and normalised (the row add_feedback writes); InvalidInput says what is wrong.
    `kinds` narrows the kinds accepted (the bulk path takes no rewrites)."""
    kind = fields.get("kind")
    if kind not in kinds:
        raise InvalidInput(f"Unknown feedback kind {kind!r}; use one of {', '.join(kinds)}.")
    allowed = _META_FIELDS | _KIND_FIELDS[kind]
    extra = {k for k, v in fields.items() if k not in allowed and v is not None}
    if extra:
        raise InvalidInput(f"Field(s) {', '.join(sorted(extra))} do not apply to a {kind} label.")
    f = {k: fields.get(k) for k in FEEDBACK_COLS}
    f["criterion"] = criterion_name(f["criterion"]) if f["criterion"] is not None else "overall"
    f["annotator"] = as_str(f["annotator"], "annotator").strip() if f["annotator"] is not None else "local"
    f["session_id"] = as_str(f["session_id"], "session_id", optional=True)
    f["idempotency_key"] = as_str(f["idempotency_key"], "idempotency_key", optional=True)
    f["source"] = as_str(f["source"], "source").strip() if f["source"] is not None else "human"
    f["prompt_id"] = as_int(f["prompt_id"], "prompt_id", optional=True)
    if kind == "ranking":
        if f["completion_id"] is not None:
            raise InvalidInput("A ranking label takes `ranking` (completion ids, best first), not completion_id.")
        r = f["ranking"]
        if isinstance(r, (str, bytes)) or not isinstance(r, (list, tuple, np.ndarray)):
            raise InvalidInput("ranking must be a list of completion ids, best first.")
        r = as_ids(list(r), "ranking entry")
        if len(r) < 2:
            raise InvalidInput("A ranking needs at least 2 completions.")
        if len(set(r)) != len(r):
            raise InvalidInput("A ranking must list each completion once.")
        f["ranking"] = r
    else:
        f["completion_id"] = as_int(f["completion_id"], "completion_id")
    if kind == "stars":
        s = f["stars"]
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not 1 <= int(s) <= 5:
            raise InvalidInput(f"stars must be an integer from 1 to 5, got {s!r}.")
        f["stars"] = int(s)
    elif kind == "thumbs":
        if not isinstance(f["up"], (bool, np.bool_)):
            raise InvalidInput(f"up must be True (thumbs up) or False (thumbs down), got {f['up']!r}.")
        f["up"] = bool(f["up"])
        tags = f["tags"]
        if tags is not None:
            if isinstance(tags, str) or not isinstance(tags, (list, tuple, set)):
                raise InvalidInput("tags must be a list of texts.")
            f["tags"] = [as_str(t, "tag").strip() for t in tags]
    elif kind == "pairwise":
        f["other_completion_id"] = as_int(f["other_completion_id"], "other_completion_id")
        if f["winner"] not in WINNERS:
            raise InvalidInput(f"winner must be one of {', '.join(WINNERS)}, got {f['winner']!r}.")
        if f["completion_id"] == f["other_completion_id"]:
            raise InvalidInput("A pairwise label needs two different completions.")
    elif kind == "critique":
        t = f["text"]
        if not isinstance(t, str) or not t.strip():
            raise InvalidInput("A critique needs non-empty text.")
        f["text"] = t.strip()
    elif kind == "rewrite":
        rewrite_text = fields.get("rewrite_text")
        if not isinstance(rewrite_text, str) or not rewrite_text.strip():
            raise InvalidInput("A rewrite needs the non-empty rewritten text (rewrite_text).")
    return f
