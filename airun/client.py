"""A small Python client of the Workers AI REST API (airun's or Cloudflare's), on httpx.

``AI(base_url, token=None, account_id="local").run(model, inputs)`` returns the ``result`` object;
``run(..., stream=True)`` yields the text pieces of the ``response`` fields as they arrive. :class:`AsyncAI` is the
same with ``await`` and ``async for``. ``base_url`` is the server root (``http://127.0.0.1:8787``) or an API root
ending in ``/client/v4``.

Invariants: every failure the server reports (an error envelope, an HTTP error status, an error frame inside a
stream) raises :class:`AiRunError` with its ``status``, ``code`` and ``message``; a stream that ends without
``data: [DONE]`` raises too, so a truncated answer is never mistaken for a complete one; leaving a stream early closes
the connection (the server then aborts the request).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class AiRunError(Exception):
    """An error answer: HTTP ``status``, Workers AI ``code`` (0 when the server sent none) and ``message``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} [{code}] {message}")
        self.status = status
        self.code = code
        self.message = message


def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/client/v4") else root + "/client/v4"


def run_path(account_id: str, model: str) -> str:
    """The run route of ``model``, its slashes kept literal (``@hf/mistral/...``), other characters escaped."""
    return f"/accounts/{quote(account_id, safe='')}/ai/run/{quote(model, safe='/@')}"


def _error_of(status: int, body: bytes) -> AiRunError:
    try:
        data = json.loads(body)
        err = data["errors"][0]
        return AiRunError(status, int(err.get("code", 0)), str(err.get("message", "")))
    except (ValueError, KeyError, IndexError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:500]
        return AiRunError(status, 0, text or httpx.codes.get_reason_phrase(status))


def _result_of(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_of(response.status_code, response.content)
    try:
        data = response.json()
    except ValueError as e:
        raise AiRunError(response.status_code, 0, f"the server sent no JSON: {response.text[:200]!r}") from e
    if not isinstance(data, dict) or data.get("success") is not True:
        raise _error_of(response.status_code, response.content)
    return data.get("result")


class _SSEParser:
    """Turns the lines of an event stream into the text pieces of its ``response`` fields."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.done = False
        self.data: list[str] = []
        self.usage: dict[str, int] | None = None

    def feed(self, line: str) -> str | None:
        if line == "":
            return self._dispatch()
        if line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
        return None

    def _dispatch(self) -> str | None:
        if not self.data:
            return None
        payload, self.data = "\n".join(self.data), []
        if payload == "[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(payload)
        except ValueError as e:
            raise AiRunError(self.status, 0, f"the stream sent a frame that is not JSON: {payload[:200]!r}") from e
        if isinstance(event, dict) and event.get("errors"):
            raise _error_of(self.status, payload.encode())
        if isinstance(event, dict) and isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        piece = event.get("response") if isinstance(event, dict) else None
        return piece if isinstance(piece, str) and piece else None

    def finish(self) -> None:
        self._dispatch()
        if not self.done:
            raise AiRunError(self.status, 0, "the stream ended before [DONE]")


class AI:
    """Synchronous client. ``last_usage`` holds the usage of the last streamed answer once it is complete."""

    def __init__(self, base_url: str, token: str | None = None, account_id: str = "local",
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.account_id = account_id
        self.last_usage: dict[str, int] | None = None
        self._http = httpx.Client(base_url=api_root(base_url), headers=headers, timeout=timeout)

    def run(self, model: str, inputs: dict[str, Any], stream: bool = False) -> Any:
        """The ``result`` of running ``model`` on ``inputs``; with ``stream``, an iterator of text pieces (the request
        is sent, and its errors raised, before this returns)."""
        body = {**inputs, "stream": True} if stream else {k: v for k, v in inputs.items() if k != "stream"}
        if not stream:
            return _result_of(self._http.post(run_path(self.account_id, model), json=body))
        request = self._http.build_request("POST", run_path(self.account_id, model), json=body)
        response = self._http.send(request, stream=True)
        if response.status_code >= 400:
            try:
                raise _error_of(response.status_code, response.read())
            finally:
                response.close()
        return self._pieces(response)

    def _pieces(self, response: httpx.Response) -> Iterator[str]:
        try:
            parser = _SSEParser(response.status_code)
            for line in response.iter_lines():
                piece = parser.feed(line)
                if piece is not None:
                    yield piece
            parser.finish()
            self.last_usage = parser.usage
        finally:
            response.close()

    def models(self, **params: Any) -> list[dict[str, Any]]:
        return _result_of(self._http.get(f"/accounts/{self.account_id}/ai/models/search", params=params))

    def schema(self, model: str) -> dict[str, Any]:
        return _result_of(self._http.get(f"/accounts/{self.account_id}/ai/models/schema", params={"model": model}))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAI:
    """Asynchronous client: ``await run(...)``, or ``async for piece in await run(..., stream=True)``."""

    def __init__(self, base_url: str, token: str | None = None, account_id: str = "local",
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.account_id = account_id
        self.last_usage: dict[str, int] | None = None
        self._http = httpx.AsyncClient(base_url=api_root(base_url), headers=headers, timeout=timeout)

    async def run(self, model: str, inputs: dict[str, Any], stream: bool = False) -> Any:
        """As :meth:`AI.run`; with ``stream``, an async iterator of text pieces."""
        body = {**inputs, "stream": True} if stream else {k: v for k, v in inputs.items() if k != "stream"}
        if not stream:
            return _result_of(await self._http.post(run_path(self.account_id, model), json=body))
        request = self._http.build_request("POST", run_path(self.account_id, model), json=body)
        response = await self._http.send(request, stream=True)
        if response.status_code >= 400:
            try:
                raise _error_of(response.status_code, await response.aread())
            finally:
                await response.aclose()
        return self._pieces(response)

    async def _pieces(self, response: httpx.Response) -> AsyncIterator[str]:
        try:
            parser = _SSEParser(response.status_code)
            async for line in response.aiter_lines():
                piece = parser.feed(line)
                if piece is not None:
                    yield piece
            parser.finish()
            self.last_usage = parser.usage
        finally:
            await response.aclose()

    async def models(self, **params: Any) -> list[dict[str, Any]]:
        return _result_of(await self._http.get(f"/accounts/{self.account_id}/ai/models/search", params=params))

    async def schema(self, model: str) -> dict[str, Any]:
        return _result_of(
            await self._http.get(f"/accounts/{self.account_id}/ai/models/schema", params={"model": model})
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
