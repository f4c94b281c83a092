"""Logins and roles for a shared studio.

Roles: "owner" may do everything; "annotator" may only label (no model change, training, import, export or
backup). The UI hides what a role may not do, and every owner-only handler also refuses it on the server.

An auth file (`--auth-file users.json`) lists accounts:
    {"users": [{"username": "ana", "password": "scrypt:...", "role": "owner"},
               {"username": "bo", "password": "scrypt:...", "role": "annotator"}]}
`rlhf-studio hash-password` writes such entries. A password is stored as a salted scrypt hash
("scrypt:<n>:<r>:<p>:<salt b64>:<hash b64>"); plain text and the older unsalted "sha256:<hex>" are still accepted,
with a warning at start-up.

Guessing is limited by client address and overall (`LoginLimits`): past the limits every login from that
address (or from anywhere) is refused, right password or not, until the window has passed; owners see the
lock-outs (`Studio.login_lockouts()`), and every failure is logged with its address.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

from .errors import StudioError

ROLES = ("owner", "annotator")
log = logging.getLogger("rlhf_studio.auth")


# scrypt at n=2**15, r=8 needs 32 MiB for each check: as costly for a guesser as for the server
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password`, as stored in an auth file."""
    if not password:
        raise StudioError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{b64(salt)}:{b64(digest)}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=32)


def password_kind(stored: str) -> str:
    """"scrypt", "sha256" (unsalted, legacy) or "plain"."""
    return stored.split(":", 1)[0] if stored.startswith(("scrypt:", "sha256:")) else "plain"


@dataclass
class Account:
    username: str
    password: str          # "scrypt:...", legacy "sha256:<hex>", or plain text
    role: str = "annotator"

    def __post_init__(self):
        if password_kind(self.password) == "scrypt":
            try:
                n, r, p, salt, digest = self.password.split(":")[1:]
                self._scrypt = (int(n), int(r), int(p), base64.b64decode(salt, validate=True),
                                base64.b64decode(digest, validate=True))
            except ValueError:
                raise StudioError(f"user {self.username!r}: the scrypt password entry is damaged; write it again "
                                  "with `rlhf-studio hash-password`") from None
            if not (2 <= self._scrypt[0] <= 2**20 and 1 <= self._scrypt[1] <= 32 and 1 <= self._scrypt[2] <= 16):
                raise StudioError(f"user {self.username!r}: scrypt parameters out of range")

    def check(self, password: str) -> bool:
        kind = password_kind(self.password)
        if kind == "scrypt":
            n, r, p, salt, digest = self._scrypt
            return hmac.compare_digest(_scrypt(password, salt, n, r, p), digest)
        if kind == "sha256":
            digest = hashlib.sha256(password.encode()).hexdigest()
            return hmac.compare_digest(digest, self.password[7:])
        return hmac.compare_digest(password.encode(), self.password.encode())


# The address of the client whose login is being checked: set for each request by ClientAddress (Gradio 6
# calls the auth callback with the user name and password only, inside the request's own task).
client_address: contextvars.ContextVar[str] = contextvars.ContextVar("client_address", default="unknown")


class ClientAddress:
    """ASGI middleware: remembers the peer address of each HTTP request for the auth callback. Behind a proxy
    or a share link every client has the proxy's address; the per-address limit then acts for all of them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            client = scope.get("client")
            client_address.set(str(client[0]) if client else "unknown")
        await self.app(scope, receive, send)


@dataclass
class LoginLimits:
    """Failed logins tolerated within `window_s`: `per_address` from one address, `overall` from all of them.
    Past a limit, logins from that address (or from everyone) are refused until the oldest failure counted
    has aged out of the window. `delay_s`: every failure is answered only after this pause."""
    per_address: int = 5
    overall: int = 50
    window_s: float = 900.0
    delay_s: float = 1.0


@dataclass
class Accounts:
    """Who may log in, and with which role. Failed logins are logged and limited per address and overall."""
    users: dict[str, Account] = field(default_factory=dict)
    limits: LoginLimits = field(default_factory=LoginLimits)
    clock: object = time.monotonic
    _by_address: dict = field(default_factory=lambda: collections.defaultdict(collections.deque))
    _all: collections.deque = field(default_factory=collections.deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def single(cls, username: str, password: str) -> "Accounts":
        return cls({username: Account(username, password, "owner")})

    @classmethod
    def from_file(cls, path: str) -> "Accounts":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise StudioError(f"cannot read the auth file {path}: {e}") from None
        users = {}
        entries = data.get("users") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise StudioError(f"{path}: expected {{\"users\": [{{\"username\", \"password\", \"role\"}}, ...]}}")
        for i, u in enumerate(entries, 1):
            if not isinstance(u, dict) or not u.get("username") or not u.get("password"):
                raise StudioError(f"{path}: user #{i} needs a username and a password")
            role = u.get("role", "annotator")
            if role not in ROLES:
                raise StudioError(f"{path}: user {u['username']!r} has unknown role {role!r} (owner or annotator)")
            users[str(u["username"])] = Account(str(u["username"]), str(u["password"]), role)
        if not any(a.role == "owner" for a in users.values()):
            raise StudioError(f"{path}: at least one user must have the role 'owner'")
        weak = sorted(name for name, a in users.items() if password_kind(a.password) != "scrypt")
        if weak:
            log.warning("%s: the password of %s is stored in plain text or as an unsalted sha256 hash; replace it "
                        "with `rlhf-studio hash-password --auth-file %s --user NAME`", path, ", ".join(weak), path)
        if os.stat(path).st_mode & 0o077:
            log.warning("%s can be read by other users of this machine (chmod 600 it)", path)
        return cls(users)

    # ------------------------------------------------------------------------------------- checking
    def check_login(self, username: str, password: str, address: str = "unknown") -> bool:
        """Whether this login is let in: refused while `address` (or everyone) is locked out, whatever the
        password; a wrong password is logged and counted."""
        locked = self.locked_out(address)
        if locked:
            log.warning("login for user %r from %s refused: %s", username, address, locked)
            self._count_failure(address, overall=False)   # the address stays out while it keeps trying
            return False
        acc = self.users.get(username)
        if acc is not None and acc.check(password or ""):
            return True
        if acc is None:          # as slow as a wrong password: the answer's time does not tell names apart
            _scrypt(password or "", b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        n = self._count_failure(address)
        log.warning("failed login for user %r from %s (%d from there in the last %.0f minutes)", username,
                    address, n, self.limits.window_s / 60)
        return False

    async def acheck(self, username: str, password: str) -> bool:
        """Gradio's auth callback; the hash and the pause after a failure run off the server's event loop."""
        address = client_address.get()
        ok = await asyncio.to_thread(self.check_login, username, password, address)
        if not ok and self.limits.delay_s:
            await asyncio.sleep(self.limits.delay_s)
        return ok

    def _count_failure(self, address: str, overall: bool = True) -> int:
        now = self.clock()
        with self._lock:
            self._forget(now)
            self._by_address[address].append(now)
            if overall:
                self._all.append(now)
            return len(self._by_address[address])

    def _forget(self, now: float) -> None:
        cut = now - self.limits.window_s
        while self._all and self._all[0] <= cut:
            self._all.popleft()
        for addr in list(self._by_address):
            q = self._by_address[addr]
            while q and q[0] <= cut:
                q.popleft()
            if not q:
                del self._by_address[addr]

    def locked_out(self, address: str) -> str:
        """Why `address` may not log in now ("" when it may)."""
        now = self.clock()
        with self._lock:
            self._forget(now)
            if len(self._all) >= self.limits.overall:
                return f"too many failed logins overall ({len(self._all)} in {self.limits.window_s / 60:.0f} minutes)"
            q = self._by_address.get(address)
            if q and len(q) >= self.limits.per_address:
                return f"too many failed logins from {address} ({len(q)} in {self.limits.window_s / 60:.0f} minutes)"
        return ""

    def lockouts(self) -> list[dict]:
        """The addresses locked out now (and "*" for everyone, past the overall limit), with their failures and
        the seconds until they may try again."""
        now = self.clock()
        lim = self.limits
        with self._lock:
            self._forget(now)
            out = []
            if len(self._all) >= lim.overall:
                out.append({"address": "*", "failures": len(self._all),
                            "seconds_left": round(self._all[-lim.overall] + lim.window_s - now, 1)})
            for addr, q in sorted(self._by_address.items()):
                if len(q) >= lim.per_address:
                    out.append({"address": addr, "failures": len(q),
                                "seconds_left": round(q[-lim.per_address] + lim.window_s - now, 1)})
        return out

    def clear_lockouts(self) -> None:
        with self._lock:
            self._by_address.clear()
            self._all.clear()

    def role(self, username: str | None) -> str:
        acc = self.users.get(username or "")
        return acc.role if acc else "annotator"


def role_of(studio, request) -> str:
    """The caller's role: owner when the studio runs without logins (a single local user)."""
    accounts = getattr(studio, "accounts", None)
    if accounts is None:
        return "owner"
    return accounts.role(getattr(request, "username", None) if request is not None else None)


def require_owner(studio, request, action: str) -> None:
    role = role_of(studio, request)
    if role != "owner":
        raise StudioError(f"your role ({role}) may not {action}; ask the studio's owner")
