"""Structured access logs and the request counter: one JSON line per HTTP request on the logger ``airun.access``.

Invariants: every HTTP request that reaches the app yields exactly one log record (``record.access`` holds the same
dict as the JSON message) and one increment of ``airun_requests_total``, once its response has ended (streams
included) or failed; ``request_id`` is the value the response's ``x-request-id`` header carries; ``route`` is the
matched route's template with path converters dropped (``{model:path}`` -> ``{model}``), or ``""`` when no route
matched, so label values stay bounded; ``model`` is the served model's name when the request ran a generation or named
it in the path, else ``""``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airun.server.metrics import SCOPE_COMPLETION_TOKENS, SCOPE_MODEL, SCOPE_PROMPT_TOKENS, ServerMetrics
from airun.server.state import AppState

access_log = logging.getLogger("airun.access")
_CONVERTER = re.compile(r"\{(\w+):[^}]*\}")
UNMATCHED_ROUTE = ""


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (``{name}`` placeholders), or ``""`` if none matched."""
    path = getattr(scope.get("route"), "path", None)
    return _CONVERTER.sub(r"{\1}", path) if isinstance(path, str) else UNMATCHED_ROUTE


def model_label(scope: Scope, state: AppState) -> str:
    note = scope.get("state") or {}
    if note.get(SCOPE_MODEL):
        return str(note[SCOPE_MODEL])
    served = state.model.name if state.model is not None else None
    named = (scope.get("path_params") or {}).get("model")
    return served if served is not None and named == served else ""


class AccessLogMiddleware:
    """Outermost ASGI layer: times each HTTP request, then logs it and counts it in ``metrics``."""

    def __init__(self, app: ASGIApp, state: AppState, metrics: ServerMetrics) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500  # what the client gets if the app fails before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status, time.monotonic() - start)

    def _record(self, scope: Scope, status: int, duration_s: float) -> None:
        note = scope.get("state") or {}
        route = route_template(scope)
        model = model_label(scope, self.state)
        entry: dict[str, Any] = {
            "request_id": note.get("request_id"),
            "method": scope.get("method"),
            "route": route,
            "status": status,
            "duration_s": round(duration_s, 6),
        }
        if model:
            entry["model"] = model
        if note.get(SCOPE_PROMPT_TOKENS) is not None:
            entry["prompt_tokens"] = note[SCOPE_PROMPT_TOKENS]
            entry["completion_tokens"] = note.get(SCOPE_COMPLETION_TOKENS, 0)
        self.metrics.observe_request(model, route, status)
        access_log.info(json.dumps(entry, separators=(",", ":")), extra={"access": entry})
