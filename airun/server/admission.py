"""Admission control in front of the generation routes: bounded queue, queued-token budget, per-client rate limits,
and refusal of new work while the server drains.

Invariants: a generation request is admitted or refused before any costly work (body parsing, tokenizing, template
rendering) — the only input used is the ``Content-Length`` header (or the bytes read so far of a chunked body);
``in_flight`` and ``queued_tokens`` count exactly the admitted requests whose ASGI call has not returned (a stream
counts until its last byte is sent or its client left); a refused request never counts. The queued-token estimate of
a request is ``ceil(body_bytes / 4)``: the whole JSON body, an upper bound on its input text, at the usual ~4 bytes a
token. Rate limits are token buckets keyed by the bearer token (or, without one, by the client address), refilled
continuously (``rpm / 60`` requests and ``tpm / 60`` estimated tokens a second).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airun.server.auth import bearer_token
from airun.server.errors import ApiError, capacity_exceeded, error_response
from airun.server.settings import ServerSettings

BYTES_PER_TOKEN = 4
MAX_BUCKETS = 10_000  # distinct clients remembered; full (idle) buckets are forgotten first
GENERATION_PATHS = (b"/v1/chat/completions", b"/v1/completions")


def rate_limited(retry_after_s: int) -> ApiError:
    """429/3021: the client sent more than its rate limit allows."""
    return ApiError(429, 3021, "Rate limit exceeded, please try again later.", {"Retry-After": str(retry_after_s)})


def draining() -> ApiError:
    """503/3040 while the server shuts down: a new request is refused, retried elsewhere."""
    return ApiError(503, 3040, "Capacity temporarily exceeded, please try again.", {"Retry-After": "5"})


def estimate_tokens(num_bytes: int) -> int:
    return -(-num_bytes // BYTES_PER_TOKEN)


def is_generation(scope: Scope) -> bool:
    """POSTs that run the model: the Workers AI run routes and the OpenAI (chat) completions routes."""
    if scope.get("method") != "POST":
        return False
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    raw = raw.split(b"?", 1)[0]
    return b"/ai/run/" in raw or raw.endswith(GENERATION_PATHS)


@dataclass(slots=True)
class TokenBucket:
    """Holds at most ``capacity`` units, refilled at ``rate`` units a second; ``level`` as of ``stamp``."""

    capacity: float
    rate: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` units are available (0 when they are now); the cost is capped at capacity."""
        missing = min(cost, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / self.rate


@dataclass(slots=True)
class RateLimiter:
    """Per-key request and token buckets; ``check`` takes from both or from neither."""

    rpm: int | None
    tpm: int | None
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[bytes, tuple[TokenBucket | None, TokenBucket | None]] = field(default_factory=dict)

    def _make(self, per_minute: int | None, now: float) -> TokenBucket | None:
        if per_minute is None:
            return None
        return TokenBucket(float(per_minute), per_minute / 60.0, float(per_minute), now)

    def check(self, key: bytes, tokens: int) -> int:
        """0 if the request may go (one request and ``tokens`` are taken), else the whole seconds to wait."""
        now = self.clock()
        pair = self._buckets.get(key)
        if pair is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            pair = (self._make(self.rpm, now), self._make(self.tpm, now))
            self._buckets[key] = pair
        wait = 0.0
        for bucket, cost in zip(pair, (1, tokens)):
            if bucket is not None:
                bucket.refill(now)
                wait = max(wait, bucket.wait_for(cost))
        if wait > 0:
            return max(1, math.ceil(wait))
        for bucket, cost in zip(pair, (1, tokens)):
            if bucket is not None:
                bucket.level -= min(cost, bucket.capacity)
        return 0

    def _forget_idle(self, now: float) -> None:
        for key, pair in list(self._buckets.items()):
            if all(b is None or (b.refill(now) or b.level >= b.capacity) for b in pair):
                del self._buckets[key]
        while len(self._buckets) >= MAX_BUCKETS:  # everyone is active: forget the oldest
            del self._buckets[next(iter(self._buckets))]


@dataclass(slots=True, eq=False)
class Admission:
    """The server's count of admitted generation requests and their estimated queued tokens, and the drain flag."""

    in_flight: int = 0
    queued_tokens: int = 0
    draining: bool = False
    batch_capacity: int = 0  # requests the engine runs at once (max_num_seqs); they do not wait
    limiter: RateLimiter | None = None

    def request_limit(self, settings: ServerSettings) -> int | None:
        if settings.max_waiting_requests is None:
            return None
        return self.batch_capacity + settings.max_waiting_requests


class AdmissionMiddleware:
    """ASGI middleware: refuses a generation request past the limits (429/3040 or 429/3021, with Retry-After) or
    while draining (503/3040), and holds the admitted ones' count until their response ends."""

    def __init__(self, app: ASGIApp, admission: Admission, settings: Callable[[], ServerSettings]) -> None:
        self.app = app
        self.admission = admission
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        adm = self.admission
        rid = (scope.get("state") or {}).get("request_id")
        if adm.draining and scope["path"] != "/health":
            await error_response(draining(), rid)(scope, receive, send)
            return
        if not is_generation(scope):
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        length = 0
        for k, v in scope.get("headers") or ():
            if k.lower() == b"content-length" and v.isdigit():
                length = int(v)
        tokens = estimate_tokens(length)
        refusal = self._refusal(settings, scope, tokens)
        if refusal is not None:
            await error_response(refusal, rid)(scope, receive, send)
            return
        adm.in_flight += 1
        adm.queued_tokens += tokens
        charged = tokens
        seen = 0
        budget = settings.max_queued_tokens

        async def charging_receive() -> Message:  # a chunked body is charged as it arrives
            nonlocal charged, seen
            message = await receive()
            if message["type"] == "http.request" and length == 0:
                seen += len(message.get("body", b""))
                extra = estimate_tokens(seen) - charged
                if extra > 0:
                    if budget is not None and adm.queued_tokens + extra > budget:
                        raise capacity_exceeded()
                    adm.queued_tokens += extra
                    charged += extra
            return message

        try:
            await self.app(scope, charging_receive, send)
        finally:
            adm.in_flight -= 1
            adm.queued_tokens -= charged

    def _refusal(self, settings: ServerSettings, scope: Scope, tokens: int) -> ApiError | None:
        adm = self.admission
        limit = adm.request_limit(settings)
        if limit is not None and adm.in_flight >= limit:
            return capacity_exceeded()
        budget = settings.max_queued_tokens
        if budget is not None and adm.in_flight > 0 and adm.queued_tokens + tokens > budget:
            return capacity_exceeded()
        if settings.rate_limit_rpm is None and settings.rate_limit_tpm is None:
            return None
        limiter = adm.limiter
        if limiter is None or (limiter.rpm, limiter.tpm) != (settings.rate_limit_rpm, settings.rate_limit_tpm):
            limiter = adm.limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        wait = limiter.check(client_key(scope), tokens)
        return rate_limited(wait) if wait else None


def engine_batch_capacity(engine: object) -> int:
    """How many requests the engine runs at once (its ``max_num_seqs``), 0 when it does not say."""
    args = getattr(getattr(engine, "engine", None), "args", None)
    return int(getattr(args, "max_num_seqs", 0) or 0)


def client_key(scope: Scope) -> bytes:
    """The bearer token when one is sent (the middleware before this one has checked it), else the client address."""
    for k, v in scope.get("headers") or ():
        if k.lower() == b"authorization":
            token = bearer_token(v)
            if token is not None:
                return b"t:" + token
    client = scope.get("client")
    return b"a:" + (client[0].encode() if client else b"?")
