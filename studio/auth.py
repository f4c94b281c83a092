"""Logins and roles for a shared studio.

Roles: "owner" may do everything; "annotator" may only label (no model change, training, import, export or
backup). The UI hides what a role may not do, and every owner-only handler also refuses it on the server.

An auth file (`--auth-file users.json`) lists accounts:
    {"users": [{"username": "ana", "password": "...", "role": "owner"},
               {"username": "bo", "password": "...", "role": "annotator"}]}
A password may be given as "sha256:<hex>" instead of plain text.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass, field

from .errors import StudioError

ROLES = ("owner", "annotator")
log = logging.getLogger("rlhf_studio.auth")


@dataclass
class Account:
    username: str
    password: str          # plain, or "sha256:<hex>"
    role: str = "annotator"

    def check(self, password: str) -> bool:
        if self.password.startswith("sha256:"):
            digest = hashlib.sha256(password.encode()).hexdigest()
            return hmac.compare_digest(digest, self.password[7:])
        return hmac.compare_digest(password.encode(), self.password.encode())


@dataclass
class Accounts:
    """Who may log in, and with which role. Wrong passwords are logged and slowed down per user."""
    users: dict[str, Account] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
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
        return cls(users)

    def _penalty(self, username: str, password: str) -> float:
        """0 for a right password; else seconds to wait, doubling with each failure in a row (logged)."""
        acc = self.users.get(username)
        ok = acc is not None and acc.check(password or "")
        with self._lock:
            if ok:
                self._failures.pop(username, None)
                return 0.0
            n = self._failures[username] = self._failures.get(username, 0) + 1
        log.warning("failed login for user %r (%d in a row)", username, n)
        return min(0.25 * 2 ** min(n, 5), 5.0)

    async def acheck(self, username: str, password: str) -> bool:
        """Gradio's auth callback; a coroutine so the slow-down does not block the server's event loop."""
        wait = self._penalty(username, password)
        if wait:
            await asyncio.sleep(wait)
        return wait == 0.0

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
