"""The ASGI layer in front of every route: request id, authentication and the request-body size limit.

Invariants: every HTTP response carries an ``x-request-id`` header whose value is ``scope["state"]["request_id"]``
(what the handlers put in their messages); with tokens configured no route but ``/health`` runs without a valid
bearer token; no handler ever receives more than ``max_body_bytes`` of body. It is plain ASGI (not Starlette's
``BaseHTTPMiddleware``), so handlers still see the client's disconnect through ``receive``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airun.server.auth import bearer_token, has_query_token, is_open_path, token_matches
from airun.server.errors import ApiError, bad_input, error_response, too_large, unauthorized
from airun.server.settings import ServerSettings


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: Callable[[], ServerSettings]) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(err: ApiError) -> None:
            await error_response(err, rid)(scope, receive, send_with_id)

        settings = self.settings()
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if has_query_token(scope.get("query_string") or b""):  # a token in a URL ends up in logs: never accepted
            await refuse(unauthorized())
            return
        public = is_open_path(raw_path) or (settings.public_metrics and raw_path == b"/metrics")
        if settings.api_tokens and not public:
            if not token_matches(bearer_token(_header(scope, b"authorization")), settings.api_tokens):
                await refuse(unauthorized())
                return

        limit = settings.max_upload_bytes if raw_path.endswith(b"/finetune-assets") else settings.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await refuse(bad_input("the Content-Length header is not an integer", rid))
                return
            if n > limit:
                await refuse(too_large())
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body without Content-Length: the 413 handler answers
                    raise StarletteHTTPException(status_code=413)
            return message

        await self.app(scope, counting_receive, send_with_id)
