"""The asyncio face of the engine: the step loop runs on its own thread; callers submit, iterate and abort."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

from airun.engine.args import EngineArgs
from airun.engine.llm_engine import LLMEngine
from airun.engine.outputs import EngineStats, RequestOutput
from airun.errors import EngineDeadError
from airun.sampling_params import SamplingParams

log = logging.getLogger("airun.engine")

_STOP = object()


class AsyncEngine:
    """Invariants: only the step-loop thread touches the ``LLMEngine`` after ``start()``; every request submitted through
    ``generate`` ends with exactly one ``finished`` output or an exception in its iterator, and a consumer that stops
    iterating early has its request aborted (its KV blocks freed) by the step loop before its next step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.model_name = engine.source.name
        self.max_model_len = engine.max_model_len
        self.is_dead = False
        self.dead_reason: str | None = None
        self.exit_on_error = False  # True: a model-step fault ends the loop (is_dead) instead of being survived
        self._commands: queue.Queue[Any] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "AsyncEngine":
        return cls(LLMEngine(args))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.is_dead

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="airun-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    # ---- public API -------------------------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: str | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self.is_dead:
            raise EngineDeadError(self.dead_reason or "the engine has stopped")
        rid = request_id or uuid.uuid4().hex
        self.engine.validate_request(prompt_token_ids, sampling)
        adapter = None
        if lora is not None:  # read from disk here, on a worker thread: the step loop never waits on a file
            lora, adapter = await asyncio.to_thread(self.engine.acquire_lora, lora)
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = stream
        self._commands.put(("add", rid, list(prompt_token_ids), sampling, lora, adapter))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._commands.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        """A snapshot taken by the step loop after its latest step (never reads engine state across threads)."""
        return self._stats

    # ---- the step loop (its own thread) -------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                block = not engine.has_unfinished()
                try:
                    cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd is _STOP:
                        self._fail_streams(EngineDeadError("the engine was shut down"), engine.fail_all("shutdown"))
                        return
                    self._handle(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if engine.has_unfinished():
                    try:
                        outputs = engine.step()
                    except Exception as exc:  # a fault in one batch: fail its requests, reset the KV state, go on
                        log.error("model step failed: %s\n%s", exc, traceback.format_exc())
                        outputs = engine.fail_all(f"{type(exc).__name__}: {exc}")
                        if self.exit_on_error:  # the operator wants a restart: dead first, so that a client
                            self.is_dead = True  # holding its error already sees /health report it
                            self.dead_reason = f"{type(exc).__name__}: {exc}"
                            self._deliver(outputs)
                            raise
                    self._deliver(outputs)
                self._stats = engine.stats()
        except BaseException as exc:  # the loop itself broke: nothing can be served any more
            log.critical("engine loop died: %s\n%s", exc, traceback.format_exc())
            self.is_dead = True
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            self._fail_streams(EngineDeadError(self.dead_reason), [])

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, sampling, lora, adapter = cmd
            if rid not in self._streams:  # the consumer already went away
                return
            try:
                self.engine.add_request(rid, ids, sampling, cache_key=lora, adapter=adapter)
            except Exception as exc:
                self._post(rid, exc)
        elif kind == "abort":
            final = self.engine.abort_request(cmd[1])
            if final is not None:
                self._deliver([final])
        elif kind == "call":  # run a function on the engine thread (tests, adapters)
            _, fn, fut = cmd
            try:
                res = fn(self.engine)
            except Exception as exc:
                self._loop.call_soon_threadsafe(_set_exc, fut, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, fut, res)

    async def call_in_engine(self, fn: Any) -> Any:
        """Runs ``fn(llm_engine)`` on the step-loop thread between steps and returns its result."""
        fut = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, fut))
        return await fut

    def _post(self, rid: str, item: RequestOutput | BaseException) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._put, rid, item)

    def _put(self, rid: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.put_nowait(item)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._put_many, outputs)

    def _put_many(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._put(out.request_id, out)

    def _fail_streams(self, exc: BaseException, outputs: list[RequestOutput]) -> None:
        self._deliver(outputs)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_all_streams, exc)

    def _fail_all_streams(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(exc)


def _set_result(fut: asyncio.Future, res: Any) -> None:
    if not fut.done():
        fut.set_result(res)


def _set_exc(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
