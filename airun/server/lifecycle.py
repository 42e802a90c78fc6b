"""The server process's life: a SIGTERM drain and the exit on a dead engine.

Invariants: after the first SIGTERM every new request but ``/health`` gets 503/3040 (and ``/health`` 503), requests
already admitted run on for up to ``shutdown_grace_s``; then every request still in the engine is aborted (its stream
ends with finish reason ``abort``), and the server stops with exit status 0 — the signal is not re-raised. A second
SIGTERM, or SIGINT, stops at once (uvicorn's own handling). With ``exit_on_engine_error`` a dead engine stops the
server with exit status 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from airun.server.state import AppState

log = logging.getLogger("airun.server")
ABORT_WAIT_S = 5.0  # after the grace period: how long the aborted requests get to send their last frames


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a graceful SIGTERM drain; ``exit_code`` is what the process should return."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self.drain_started: float | None = None
        self.aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_started is None and not self.should_exit:
            self.begin_drain()
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        """Refuses new requests from now on; :meth:`on_tick` finishes the drain."""
        log.info("draining: new requests are refused; in-flight ones get %.0f s",
                 self.state.settings.shutdown_grace_s)
        self.state.admission.draining = True
        self.drain_started = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        state = self.state
        engine = state.engine
        if state.settings.exit_on_engine_error and engine is not None and engine.is_dead:
            log.critical("the engine died (%s): exiting", engine.dead_reason)
            self.exit_code = 1
            return True
        if self.drain_started is None:
            return False
        idle = state.admission.in_flight == 0 and state.active_requests == 0
        if idle:
            return True
        now = time.monotonic()
        if self.aborted_at is None and now - self.drain_started >= state.settings.shutdown_grace_s:
            self.aborted_at = now
            await abort_all(state)
        return self.aborted_at is not None and now - self.aborted_at >= ABORT_WAIT_S


async def abort_all(state: AppState) -> int:
    """Aborts every request in the engine (each ends with finish reason ``abort``); returns how many."""
    engine = state.engine
    if engine is None or not engine.is_running:
        return 0
    ids: list[str] = await engine.call_in_engine(lambda e: list(e.requests))
    log.info("grace period over: aborting %d requests", len(ids))
    for rid in ids:
        await engine.abort(rid)
    return len(ids)
