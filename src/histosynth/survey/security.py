"""Protection of the survey's forms and admin pages.

Every form carries a token signed with a server-side key (stored in the responses database, so it
survives restarts): a page from another site cannot read it and so cannot forge a post. Posts must
also come from the survey's own origin (``Origin``/``Sec-Fetch-Site``, or ``Referer`` when a browser
sends neither). The admin pages accept either a session cookie set after entering the secret, or
``Authorization: Bearer <secret>`` for scripts.

New participants are admitted by invitation (one code, one participant) or, in open mode, by anyone
with the address; :class:`StartLimiter` bounds how fast one client address may create participants
without an invitation, so a script cannot fill the survey with made-up people.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import deque
from typing import Callable
from urllib.parse import urlsplit

from fastapi import Request

from .. import validation
from ..errors import ConfigError

ADMIN_COOKIE = "histosynth_admin"
MIN_SECRET_LENGTH = 12


def new_admin_secret() -> str:
    return secrets.token_urlsafe(18)


def check_admin_secret(secret: str) -> str:
    if len(secret) < MIN_SECRET_LENGTH or not secret.isprintable() or secret != secret.strip():
        raise ConfigError(f"the admin secret must be at least {MIN_SECRET_LENGTH} printable characters "
                          "without surrounding spaces; leave --admin-secret out to get a random one")
    return secret


class FormSigner:
    """Signs form scopes ("start", "participant:<token>", ...) with the server's key."""

    def __init__(self, key: str):
        self._key = key.encode()

    def token(self, scope: str) -> str:
        return hmac.new(self._key, scope.encode(), hashlib.sha256).hexdigest()

    def valid(self, scope: str, given: str) -> bool:
        return hmac.compare_digest(self.token(scope).encode(), given.encode())

    def admin_session(self, admin_secret: str) -> str:
        """The admin cookie's value: changes when the admin secret does, so old sessions end."""
        return self.token(f"admin-session:{admin_secret}")

    def valid_admin_session(self, admin_secret: str, cookie: str) -> bool:
        return self.valid(f"admin-session:{admin_secret}", cookie)


def same_origin(request: Request) -> bool:
    """Whether a post was sent by a page of this server (a cross-site form post is refused)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return True  # no browser hint at all (e.g. a script); the signed form token still applies
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    host = request.headers.get("host", "")
    return origin == f"{request.url.scheme}://{host}"


def secret_matches(given: str, admin_secret: str) -> bool:
    return hmac.compare_digest(given.encode(), admin_secret.encode())


def admin_bearer_ok(request: Request, admin_secret: str) -> bool:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secret_matches(value, admin_secret)


class StartLimiter:
    """At most `limit` participant starts per `window_s` seconds from one client address."""

    # Past this many tracked addresses, expired ones are dropped, so memory stays bounded.
    SWEEP_AT = 10_000

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        check_start_limit(limit, window_s)
        self.limit, self.window_s = limit, float(window_s)
        self._clock = clock
        self._starts: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, address: str) -> bool:
        """Whether `address` may start now; an allowed start is counted."""
        now = self._clock()
        with self._lock:
            if len(self._starts) > self.SWEEP_AT:
                for key in [k for k, times in self._starts.items() if times[-1] <= now - self.window_s]:
                    del self._starts[key]
            times = self._starts.setdefault(address, deque())
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) >= self.limit:
                return False
            times.append(now)
            return True

    def retry_after(self, address: str) -> int:
        """Whole seconds until `address` may start again (0 if it may now)."""
        with self._lock:
            times = self._starts.get(address)
            if not times or len(times) < self.limit:
                return 0
            return max(1, math.ceil(times[0] + self.window_s - self._clock()))


def check_start_limit(limit: int, window_s: float) -> None:
    validation.int_at_least(limit, "--start-limit", 1)
    validation.finite_float(window_s, "--start-window (seconds)", low=1, high=86_400)
