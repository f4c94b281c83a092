"""The channel between the app and a training job: data only, on a socket nobody else can join.

Joining: the app makes a `socketpair` and the job inherits one end as a file descriptor (`pass_fds`). The pair
has no address (no port, no path), so there is nothing another process can connect to, and no secret: the job's
command line says only the descriptor's number (`--channel-fd 3`).

Messages are tuples of str/int/float/bool/None/list/dict/bytes, sent as one frame:
    b"RLC1" | u32 header length | u64 blob bytes | header (JSON) | blobs
Bytes (safetensors checkpoints, reward weights, adapter zips) travel as raw blobs after the header and are
referred to from the JSON by index, so nothing is ever unpickled. Each end names the messages it accepts
(`expect`): the kind (first item) and the type, or a check, of every further item. A frame that is too large,
not JSON, or not one of the expected messages raises `ChannelError` before anything acts on it.
"""
from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from typing import Any, Callable, Mapping

MAGIC = b"RLC1"
_PREFIX = struct.Struct(">4sIQ")
_BLOB = "\x00blob"                  # {"\x00blob": i} in the JSON stands for the i-th blob
MAX_HEADER_BYTES = 16 * 2**20       # control, metrics, samples, prompts: JSON text
MAX_BLOB_BYTES = 8 * 2**30          # a checkpoint with optimizer state of a large LoRA stays well below


class ChannelError(ValueError):
    """The other end sent something that is not an expected message (bad frame, size, kind or field)."""


# A message spec: the types (or checks) of the items after the kind; items after `...` may be left out.
Spec = tuple


class Channel:
    """One end of the app <-> job channel: `send(tuple)`, `recv() -> tuple`, `poll(timeout)`, `close()`.

    recv raises EOFError when the other end is gone and ChannelError on anything unexpected; after a
    ChannelError the stream is out of step, so the caller closes the channel (and stops the job)."""

    def __init__(self, sock: socket.socket, expect: Mapping[str, Spec], max_blob_bytes: int = MAX_BLOB_BYTES):
        self.sock, self.expect, self.max_blob_bytes = sock, dict(expect), int(max_blob_bytes)
        self._send_lock = threading.Lock()      # a cancel from the UI thread may meet a send from another

    # ------------------------------------------------------------------------------------------ sending
    def send(self, msg: tuple) -> None:
        if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
            raise TypeError(f"a channel message is a tuple starting with its kind, got {type(msg).__name__}")
        blobs: list[bytes] = []
        header = json.dumps({"m": _encode(list(msg), blobs), "n": [len(b) for b in blobs]},
                            separators=(",", ":")).encode("utf-8")
        total = sum(len(b) for b in blobs)
        if len(header) > MAX_HEADER_BYTES or total > self.max_blob_bytes:
            raise ChannelError(f"message {msg[0]!r} is too large to send ({len(header)} + {total} bytes)")
        with self._send_lock:
            self.sock.sendall(_PREFIX.pack(MAGIC, len(header), total) + header)
            for b in blobs:
                self.sock.sendall(b)

    # ---------------------------------------------------------------------------------------- receiving
    def recv(self) -> tuple:
        magic, n_header, n_blobs = _PREFIX.unpack(self._read(_PREFIX.size))
        if magic != MAGIC:
            raise ChannelError("not a studio channel frame (bad magic bytes)")
        if n_header > MAX_HEADER_BYTES or n_blobs > self.max_blob_bytes:
            raise ChannelError(f"message too large ({n_header} header + {n_blobs} blob bytes; at most "
                               f"{MAX_HEADER_BYTES} + {self.max_blob_bytes})")
        try:
            header = json.loads(self._read(n_header).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ChannelError(f"message header is not JSON: {e}") from None
        sizes = header.get("n") if isinstance(header, dict) else None
        if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes) \
                or sum(sizes) != n_blobs:
            raise ChannelError("message header does not describe its blobs")
        blobs = [self._read(n) for n in sizes]
        msg = _decode(header.get("m"), blobs)
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            raise ChannelError("a message must be a list starting with its kind")
        check_message(tuple(msg), self.expect)
        return tuple(msg)

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a message (or the end of the stream) is waiting to be read."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:], min(n - got, 1 << 24))
            if k == 0:
                raise EOFError("the other end closed the channel")
            got += k
        return bytes(buf)


# ------------------------------------------------------------------------------------------ encoding
def _encode(v: Any, blobs: list[bytes]) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        blobs.append(bytes(v))
        return {_BLOB: len(blobs) - 1}
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return [_encode(x, blobs) for x in v]
    if isinstance(v, dict):
        if _BLOB in v or not all(isinstance(k, str) for k in v):
            raise TypeError("channel dicts need text keys")
        return {k: _encode(x, blobs) for k, x in v.items()}
    if hasattr(v, "item") and callable(v.item):      # a numpy / torch scalar
        return _encode(v.item(), blobs)
    raise TypeError(f"a {type(v).__name__} cannot be sent over the channel (str/int/float/bool/None/list/"
                    "dict/bytes only)")


def _decode(v: Any, blobs: list[bytes]) -> Any:
    if isinstance(v, list):
        return [_decode(x, blobs) for x in v]
    if isinstance(v, dict):
        if _BLOB in v:
            i = v[_BLOB]
            if len(v) != 1 or type(i) is not int or not 0 <= i < len(blobs):
                raise ChannelError("message refers to a blob it does not carry")
            return blobs[i]
        return {k: _decode(x, blobs) for k, x in v.items()}
    return v


# ------------------------------------------------------------------------------------------ checking
def check_message(msg: tuple, expect: Mapping[str, Spec]) -> None:
    """Raise ChannelError unless `msg` is one of the `expect`ed kinds with items of the expected types."""
    kind, items = msg[0], msg[1:]
    if kind not in expect:
        raise ChannelError(f"unexpected message kind {kind[:40]!r} (expected one of {', '.join(sorted(expect))})")
    spec = expect[kind]
    required = spec.index(...) if ... in spec else len(spec)
    fields = [s for s in spec if s is not ...]
    if not required <= len(items) <= len(fields):
        raise ChannelError(f"message {kind!r} has {len(items)} items, expected "
                           f"{required if required == len(fields) else f'{required} to {len(fields)}'}")
    for i, (value, want) in enumerate(zip(items, fields), 1):
        if not _fits(value, want):
            raise ChannelError(f"message {kind!r}: item {i} is a {type(value).__name__} that does not fit "
                               f"{getattr(want, '__name__', want)}")


def _fits(value: Any, want) -> bool:
    if isinstance(want, tuple):
        return any(_fits(value, w) for w in want)
    if want is None:
        return value is None
    if isinstance(want, type):
        if want is int:                  # True is not a step number
            return type(value) is int
        if want is float:
            return type(value) in (int, float)
        return isinstance(value, want)
    return bool(want(value))


# Checks for message items; each returns whether the value fits.
def number(v) -> bool:
    return type(v) in (int, float)


def step(v) -> bool:
    return type(v) is int and 0 <= v < 2**53


def short_text(v, limit: int = 2**20) -> bool:
    """A text of at most a million characters (a long prompt fits; the frame's header is capped anyway)."""
    return isinstance(v, str) and len(v) <= limit


def numbers_by_name(v) -> bool:
    return isinstance(v, dict) and len(v) <= 1000 and all(
        isinstance(k, str) and len(k) <= 200 and number(x) for k, x in v.items())


def records(fields: Mapping[str, Callable[[Any], bool]], most: int = 1000) -> Callable[[Any], bool]:
    """A check for a list of at most `most` dicts with exactly these fields."""
    def check(v) -> bool:
        return isinstance(v, list) and len(v) <= most and all(
            isinstance(r, dict) and set(r) == set(fields) and all(fields[k](r[k]) for k in r) for r in v)
    check.__name__ = f"list of {{{', '.join(fields)}}}"
    return check


# --------------------------------------------------------------------------------------- processes
def spawn(module: str, expect: Mapping[str, Spec], env: Mapping[str, str] | None = None,
          cwd: str | None = None) -> tuple[subprocess.Popen, Channel]:
    """Start `python -m module --channel-fd N` holding one end of a fresh socketpair; return it and our end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen([sys.executable, "-m", module, "--channel-fd", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), env=dict(env) if env is not None else None, cwd=cwd)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()            # the child holds its own copy; ours closing lets EOF reach us when it dies
    return proc, Channel(ours, expect)


def inherited(argv: list[str], expect: Mapping[str, Spec]) -> Channel:
    """In the job: the channel named by `--channel-fd N` on its command line."""
    if len(argv) != 2 or argv[0] != "--channel-fd" or not argv[1].isdigit():
        raise SystemExit("usage: python -m rlhf_studio.studio.jobs --channel-fd N (started by the studio, not by hand)")
    fd = int(argv[1])
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX:
        raise SystemExit(f"file descriptor {fd} is not the studio's channel")
    os.set_inheritable(fd, False)
    return Channel(sock, expect)
