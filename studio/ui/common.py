"""Small helpers shared by the tabs: who is labelling, and how results are shown."""
from __future__ import annotations

import functools
import html
import inspect
import re
import string

import gradio as gr

from ..auth import require_owner, role_of
from ..errors import StudioError

LETTERS = string.ascii_uppercase[:8]
ERROR_PREFIX = "**Error:**"


def annotator_of(request: gr.Request | None, default: str = "local") -> str:
    """The logged-in user name when auth is on, else the local user."""
    user = getattr(request, "username", None) if request is not None else None
    return str(user) if user else default


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def owner_upload(studio, request: gr.Request | None, f, action: str) -> str:
    """The path of the file uploaded to `action`; StudioError where the user is no owner or chose no file."""
    require_owner(studio, request, action)
    if f is None:
        raise StudioError("choose a file first")
    return f if isinstance(f, str) else f.name


# Markdown that turns text into something else: links and images ([..](..), ![..](..)), emphasis, code, tables,
# strike-through, headings, lists and underlines at a line's start; HTML (<, >, &) becomes entities.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]~|])")
_MD_LINE_START = re.compile(r"^(\s*\d*)([#+=-]|(?<=\d)[.)])", re.MULTILINE)


def md_text(text) -> str:
    """Any text (a prompt, a completion, a critique, a criterion, a file name, an error quoting them) as Markdown
    that shows exactly that text: no link, image, emphasis or HTML element can come out of it."""
    s = _MD_SPECIAL.sub(r"\\\1", str(text))
    s = _MD_LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), s)
    return html.escape(s, quote=False)


def ok(message: str) -> str:
    """A message for a Markdown status line, shown as text (it may quote what a user typed or imported)."""
    return md_text(message)


def fail(message: str) -> str:
    return f"{ERROR_PREFIX} {md_text(message)}"


def blind_view(studio, request: gr.Request | None) -> bool:
    """Whether this caller must see no policy/adapter names and no reward-model scores: in blind mode (--blind),
    everyone but an owner who logged in as one (blind mode without logins has no owner: app.launch_app)."""
    return bool(getattr(studio, "blind", False)) and role_of(studio, request) != "owner"


def letters_to_index(text: str, n: int) -> list[int]:
    """'C A B' or 'CAB' or 'c,a,b' -> [2, 0, 1]; raises ValueError with a readable message."""
    cleaned = [ch for ch in (text or "").upper() if ch.isalpha()]
    idx = []
    for ch in cleaned:
        i = LETTERS.find(ch)
        if i < 0 or i >= n:
            raise ValueError(f"'{ch}' is not one of the completions shown ({', '.join(LETTERS[:n])})")
        idx.append(i)
    return idx


def policy_names(studio) -> list[str]:
    """The policies one can generate with: "base" and each stored adapter, oldest first."""
    ad = studio.adapters()
    return ["base"] + ([f"adapter-{int(i)}" for i in ad["id"]] if len(ad) else [])


def unless_sent(sent: dict, now: dict, name: str, key, make=None) -> list:
    """[an output's value], or [gr.skip()] where this browser tab was last sent the same thing (per `key`), for
    refreshes on a timer. Records the key in `now`, the state that goes back to the tab. make(key) builds the
    value; without it the key is the value (a DataFrame is compared by its JSON)."""
    k = key.to_json(date_format="iso") if hasattr(key, "to_json") else key
    now[name] = k
    if name in sent and sent[name] == k:
        return [gr.skip()]
    return [make(key) if make else key]


def bind(fn, *bound):
    """fn with its first arguments bound (the studio, a card's index), for wiring a module-level handler to an
    event. Unlike functools.partial it keeps what Gradio reads: the remaining signature with its annotations
    (gr.Request and gr.SelectData are passed by annotation) and whether fn is a generator (streamed outputs)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            yield from fn(*bound, *args, **kwargs)
    else:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(*bound, *args, **kwargs)
    sig = inspect.signature(fn)
    call.__signature__ = sig.replace(parameters=list(sig.parameters.values())[len(bound):])
    return call
