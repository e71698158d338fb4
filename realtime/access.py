"""Who may use the server beyond localhost: a bearer token on the API, the page's own origin for
browsers, and a bound on how often one address may offer a call."""

from __future__ import annotations

import collections
import hmac
import time
from typing import Callable
from urllib.parse import urlsplit

from aiohttp import web

RATE_WINDOW_S = 60.0
PROTECTED_PREFIXES = ("/api/", "/ws", "/v1/", "/metrics")  # the page and its files stay public: they hold no data


def token_given(request: web.Request) -> str:
    """The bearer token of a request: the Authorization header, or `?token=` where a browser
    cannot set headers (its WebSocket API)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else request.query.get("token", "")


def token_matches(request: web.Request, token: str) -> bool:
    return hmac.compare_digest(token_given(request).encode(), token.encode())


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """A browser names the page that makes the request: only this server's own page, or one listed,
    may open calls. Other clients send no Origin; the token guards them."""
    origin = request.headers.get("Origin")
    if origin is None or origin in allowed:
        return True
    return urlsplit(origin).netloc == request.host


class OfferRate:
    """Owns the recent offer times of each client address: at most `per_minute` in any minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._times: dict[str, collections.deque[float]] = {}

    def allow(self, address: str) -> bool:
        now = self._clock()
        times = self._times.setdefault(address, collections.deque())
        while times and now - times[0] >= RATE_WINDOW_S:
            times.popleft()
        if len(times) >= self.per_minute:
            return False
        times.append(now)
        if len(self._times) > 4096:  # an address seen once long ago is forgotten
            self._times = {a: t for a, t in self._times.items() if t and now - t[-1] < RATE_WINDOW_S}
        return True
