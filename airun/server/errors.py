"""Workers AI error codes, the response envelope, and the exception handlers that keep every error in it.

Invariants: every error response carries the envelope ``{"result": null, "success": false, "errors": [{code,
message}], "messages": []}`` and an HTTP status >= 400 (never 200); anything a client sent maps to a 4xx, and only an
unexpected exception gives 500/3001. Messages follow the table of the Workers AI API reference, and every message a
client receives (envelope or stream error frame) ends with Workers AI's `` (<request id>)`` suffix, the id of the
response's ``x-request-id`` header.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("airun.server")


class ApiError(Exception):
    """An error answer: HTTP ``status``, Workers AI ``code`` and the client-facing ``message``."""

    def __init__(self, status: int, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def payload(self, request_id: str | None) -> dict[str, Any]:
        """The error envelope as sent to the client, its message suffixed with ``request_id``."""
        return error_envelope(self.code, with_request_id(self.message, request_id))


def with_request_id(message: str, request_id: str | None) -> str:
    """``message (request_id)``; idempotent, so an id added early is never doubled."""
    if not request_id or message.endswith(f" ({request_id})"):
        return message
    return f"{message} ({request_id})"


# ---- the rows of the error table ------------------------------------------------------------------------------------
def unauthorized() -> ApiError:
    return ApiError(401, 10000, "Authentication error")


def not_found(path: str) -> ApiError:
    return ApiError(404, 7003, f"Could not route to {path}, perhaps your object identifier is invalid?")


def method_not_allowed(method: str, path: str, allow: str | None) -> ApiError:
    headers = {"Allow": allow} if allow else None
    return ApiError(405, 7001, f"Method {method} not allowed for {path}", headers)


def unknown_model(model: str) -> ApiError:
    return ApiError(400, 5007, f"No such model {model} or task")


def bad_input(detail: str, request_id: str | None) -> ApiError:
    return ApiError(400, 5006, with_request_id(f"AiError: Bad input: {detail}", request_id))


def invalid_input(detail: str) -> ApiError:
    return ApiError(400, 3010, f"Invalid or incomplete input for the model: {detail}")


def context_window(num_tokens: int, limit: int, request_id: str | None) -> ApiError:
    msg = (
        f"AiError: Ai: The estimated number of input and maximum output tokens ({num_tokens}) "
        f"exceeded this model context window limit ({limit})."
    )
    return ApiError(413, 5021, with_request_id(msg, request_id))


def too_large() -> ApiError:
    return ApiError(413, 3006, "Request is too large")


def timed_out() -> ApiError:
    return ApiError(408, 3007, "Request timeout")


def capacity_exceeded(retry_after_s: int = 1, status: int = 429) -> ApiError:
    headers = {"Retry-After": str(retry_after_s)}
    return ApiError(status, 3040, "Capacity temporarily exceeded, please try again.", headers)


def lora_unsupported(model: str) -> ApiError:
    return ApiError(405, 5005, f"The model {model} does not support LoRa inference")


def internal_error(status: int = 500) -> ApiError:
    return ApiError(status, 3001, "Internal server error")


# ---- envelopes ------------------------------------------------------------------------------------------------------
def envelope(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def error_envelope(code: int, message: str) -> dict[str, Any]:
    return {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.payload(request_id), status_code=err.status, headers=headers)


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One line naming each failing field (its location) and why, from pydantic / FastAPI errors."""
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON{': ' + str(why) if why else ''}"
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
        where = "/" + "/".join(loc) if loc else "/"
        parts.append(f"'{where}': {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def allowed_methods(request: Request, hint: str | None = None) -> str:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's, in ``hint``)."""
    methods = {m.strip() for m in (hint or "").split(",") if m.strip()}
    probe = {**request.scope, "method": "__none__"}

    def walk(routes: list[Any]) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included routers (no prefix used here)
            if inner is not None:
                walk(list(inner.routes))
                continue
            match, _ = route.matches(probe)
            if match is not Match.NONE:
                methods.update(getattr(route, "methods", None) or ())

    walk(list(request.app.routes))
    return ", ".join(sorted(methods))


# ---- handlers -------------------------------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    """Routes every failure through the envelope: ApiError as given, unknown routes as 7003, request validation as
    5006, and any other exception as 500/3001 (logged with its traceback)."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc, request_id_of(request))

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        rid = request_id_of(request)
        path = request.url.path
        if exc.status_code == 404:
            return error_response(not_found(path), rid)
        if exc.status_code == 405:
            hint = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
            return error_response(method_not_allowed(request.method, path, allowed_methods(request, hint)), rid)
        if exc.status_code == 413:
            return error_response(too_large(), rid)
        if 400 <= exc.status_code < 500:
            msg = with_request_id(f"AiError: Bad input: {exc.detail}", rid)
            return error_response(ApiError(exc.status_code, 5006, msg), rid)
        return error_response(internal_error(exc.status_code if exc.status_code >= 500 else 500), rid)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        from airun.server.body import is_json_content_type  # body.py builds its errors from this module

        rid = request_id_of(request)
        errors = list(exc.errors())
        ctype = request.headers.get("content-type")
        if any((e.get("loc") or ("",))[0] == "body" for e in errors) and not is_json_content_type(ctype):
            detail = f"unsupported Content-Type {ctype!r}: send the input as application/json"
        else:
            detail = describe_validation_errors(errors)
        return error_response(bad_input(detail, rid), rid)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(internal_error(), request_id_of(request))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
