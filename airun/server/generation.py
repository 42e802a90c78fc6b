"""Running one request on the engine for an HTTP handler: admission, the wait, the client's disconnect, errors.

Invariants: a request whose client goes away (or whose time runs out) is aborted in the engine before the handler
returns — the engine iterator is cancelled or closed, which aborts it and frees its KV blocks; every engine failure
becomes an ApiError (never a bare exception); ``AppState.active_requests`` is incremented exactly once per admitted
request and decremented exactly once when it ends, streams included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from airun.engine.outputs import RequestOutput
from airun.errors import ContextLengthError, EngineDeadError, InvalidRequestError, RequestAbortedError
from airun.sampling_params import SamplingParams
from airun.server.errors import ApiError, capacity_exceeded, context_window, internal_error, invalid_input, timed_out
from airun.server.finetunes import lora_error
from airun.server.metrics import track_generation
from airun.server.sse import wait_for_disconnect
from airun.server.state import AppState

log = logging.getLogger("airun.server")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def engine_error(exc: BaseException, request_id: str | None) -> ApiError:
    """The ApiError a client gets for an exception raised by the engine."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return context_window(exc.num_tokens, exc.limit, request_id)
    lora = lora_error(exc, None)  # 5005 / 3037 / 3039
    if lora is not None:
        return lora
    if isinstance(exc, InvalidRequestError):
        return invalid_input(str(exc))
    if isinstance(exc, EngineDeadError):
        return internal_error(503)
    if isinstance(exc, RequestAbortedError):
        return internal_error()
    log.error("request %s failed: %r", request_id, exc, exc_info=exc)
    return internal_error()


def output_error(out: RequestOutput) -> ApiError | None:
    if out.finished and out.finish_reason == "error":
        log.error("request %s failed in the engine: %s", out.request_id, out.error)
        return internal_error()
    return None


class Generation:
    """One admitted request: its engine iterator, consumed either whole (:meth:`complete`) or output by output."""

    def __init__(self, state: AppState, request: Request, prompt_ids: list[int], sampling: SamplingParams,
                 request_id: str, lora: str | None) -> None:
        engine = state.require_engine()
        limit = state.settings.max_concurrent_requests
        if limit is not None and state.active_requests >= limit:
            raise capacity_exceeded()
        total = len(prompt_ids) + sampling.max_tokens
        if total > engine.max_model_len:  # the engine checks it too; this answers before any work is queued
            raise context_window(total, engine.max_model_len, request_id)
        cap = state.settings.max_tokens_cap
        if cap is not None and sampling.max_tokens > cap:
            sampling = dataclasses.replace(sampling, max_tokens=cap)
        self.state = state
        self.request = request
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_ids)
        timeout = state.settings.request_timeout_s
        self.deadline: float | None = None if timeout is None else time.monotonic() + timeout
        outputs = track_generation(request, engine.generate(prompt_ids, sampling, request_id=request_id, lora=lora))
        self._outputs: AsyncGenerator[RequestOutput, None] = outputs  # type: ignore[assignment]
        self._released = False
        state.active_requests += 1

    async def _race(self, awaitable: Awaitable[T], timeout: float | None) -> T:
        """``awaitable``'s result, unless the client disconnects (ClientDisconnected) or ``timeout`` passes (408)
        first; then it is cancelled, which aborts the engine request."""
        task = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(wait_for_disconnect(self.request.receive))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                if not t.done():
                    t.cancel()
        if task in done:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            return task.result()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await self.close()
        if watcher in done:
            raise ClientDisconnected()
        raise timed_out()

    async def complete(self) -> Completion:
        async def consume() -> Completion:
            parts: list[str] = []
            last: RequestOutput | None = None
            async for out in self._outputs:
                err = output_error(out)
                if err is not None:
                    raise err
                parts.append(out.text)
                last = out
            assert last is not None and last.finished
            return Completion("".join(parts), last.finish_reason or "stop", last.num_prompt_tokens,
                              last.num_output_tokens)

        try:
            return await self._race(consume(), self.remaining())
        except (ApiError, ClientDisconnected):
            raise
        except Exception as exc:
            raise engine_error(exc, self.request_id) from exc
        finally:
            await self.close()

    async def first(self) -> RequestOutput:
        """The first output, waited for with disconnect detection; errors the engine raises up front (validation,
        context length) become ApiErrors here, before any byte of a stream is sent."""
        try:
            out = await self._race(self._outputs.__anext__(), self.remaining())
        except (ApiError, ClientDisconnected):
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise engine_error(exc, self.request_id) from exc
        err = output_error(out)
        if err is not None:
            await self.close()
            raise err
        return out

    def remaining(self) -> float | None:
        """Seconds left before the request timeout (None: no timeout); never negative."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def next(self) -> RequestOutput:
        """The next output after :meth:`first` (StopAsyncIteration after the finished one); 408/3007 once the request
        timeout has passed (the engine request is then aborted). The caller closes the generation when it stops
        asking."""
        left = self.remaining()
        if left is None:
            return await self._outputs.__anext__()
        try:
            return await asyncio.wait_for(self._outputs.__anext__(), left)
        except TimeoutError:
            await self.close()
            raise timed_out() from None

    async def stream(self, first: RequestOutput) -> AsyncGenerator[RequestOutput, None]:
        """``first``, then every later output up to the finished one; a failure becomes an ApiError. Closes the
        generation when it ends or is closed (use it under ``contextlib.aclosing``)."""
        try:
            out = first
            while True:
                err = output_error(out)
                if err is not None:
                    raise err
                yield out
                if out.finished:
                    return
                try:
                    out = await self.next()
                except StopAsyncIteration:
                    return
                except ApiError:
                    raise
                except Exception as exc:
                    raise engine_error(exc, self.request_id) from exc
        finally:
            await self.close()

    async def close(self) -> None:
        """Ends the engine request if still running (aborts it, freeing its KV blocks) and releases the slot."""
        if self._released:
            return
        self._released = True
        self.state.active_requests -= 1
        with contextlib.suppress(Exception):
            await self._outputs.aclose()
