"""Server-sent events: frame encoding and a streaming response that stops its producer when the client leaves.

Invariants: every frame is ``data: <one line>\\n\\n`` (JSON never contains a raw newline); the producer iterator is
closed (``aclose()``) however the response ends — finished, client disconnected, send failed or cancelled — so an
engine request behind it is always aborted or finished, never left running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("airun.server")
PADDING_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
DONE_FRAME = b"data: [DONE]\n\n"


def padding() -> str:
    """A random-length (1..36) prefix of PADDING_ALPHABET: hides token lengths from a network observer."""
    return PADDING_ALPHABET[: 1 + secrets.randbelow(len(PADDING_ALPHABET))]


def frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (``http.disconnect``); the request body must have been read already."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """``text/event-stream`` response over an async iterator of already-encoded frames."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.frames = frames
        self.extra_headers = headers or {}
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ] + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.extra_headers.items()]

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            async for chunk in self.frames:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump_task, watch_task):
                if not task.done():
                    task.cancel()
            for task in (pump_task, watch_task):
                try:
                    await task
                except (asyncio.CancelledError, OSError):  # the client left: nothing to report
                    pass
                except Exception:
                    log.exception("the event stream failed")
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing the event stream failed")
