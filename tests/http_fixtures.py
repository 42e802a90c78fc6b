"""A real airun HTTP server for tests: a real engine behind a real uvicorn on a free loopback port, in this process
(a background thread with its own event loop), so that tests can read ``engine.stats()`` directly.

A plain module (not a conftest): use ``live_server(...)`` as a context manager inside a module-scoped fixture.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from airun.engine.args import EngineArgs
from airun.engine.async_engine import AsyncEngine
from airun.engine.outputs import EngineStats
from airun.server.app import create_app
from airun.server.settings import ServerSettings
from airun.server.state import AppState

START_TIMEOUT_S = 60.0


def small_engine_args(model: str | Path | None = None, **overrides: object) -> EngineArgs:
    """Engine settings sized for tests: float32, a small KV cache, a 2048-token window, at most 2 threads."""
    kw: dict[str, object] = dict(
        model=None if model is None else str(model),
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_gb=0.1,
        max_num_seqs=8,
        threads=max(1, min(2, os.cpu_count() or 1)),
        show_progress=False,
    )
    kw.update(overrides)
    return EngineArgs(**kw)  # type: ignore[arg-type]


@dataclass(slots=True, eq=False)
class LiveServer:
    url: str
    app: FastAPI
    engine: AsyncEngine
    server: uvicorn.Server

    @property
    def state(self) -> AppState:
        return self.app.state.airun

    @property
    def settings(self) -> ServerSettings:
        return self.state.settings

    @property
    def model(self) -> str:
        assert self.state.model is not None
        return self.state.model.name

    def run_url(self, model: str | None = None, account: str = "local") -> str:
        return f"{self.url}/client/v4/accounts/{account}/ai/run/{model or self.model}"

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def wait_idle(self, timeout_s: float = 1.0) -> EngineStats:
        """Waits until the engine runs nothing and holds no KV block (returns the stats seen last, idle or not)."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.engine.stats()
            idle = s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0
            if idle and self.state.active_requests == 0:
                return s
            if time.monotonic() > deadline:
                return s
            time.sleep(0.02)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@contextmanager
def serve_app(app: FastAPI) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serves ``app`` on a free loopback port in a background thread; yields its base URL and the server."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="airun-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def live_server(
    engine_args: EngineArgs | None = None,
    settings: ServerSettings | None = None,
    engine: AsyncEngine | None = None,
) -> Iterator[LiveServer]:
    """Loads the engine (the demo model by default), serves it on a free port and stops both on exit."""
    engine = engine or AsyncEngine.from_args(engine_args or small_engine_args())
    app = create_app(engine, settings or ServerSettings())
    with serve_app(app) as (url, server):
        yield LiveServer(url, app, engine, server)


@contextmanager
def live_server_url(settings: ServerSettings | None = None) -> Iterator[str]:
    """The base URL of a live server on the demo model (for tests that only speak HTTP)."""
    with live_server(settings=settings) as srv:
        yield srv.url


def strip_request_id(message: str, request_id: str) -> str:
    """``message`` without its Workers AI `` (<request id>)`` suffix, which must be there and name ``request_id``."""
    suffix = f" ({request_id})"
    assert request_id and message.endswith(suffix), (message, request_id)
    return message[: -len(suffix)]


def without_request_id(response: httpx.Response) -> dict[str, Any]:
    """``response``'s error envelope with each message's request-id suffix checked against ``x-request-id`` and cut."""
    body: dict[str, Any] = response.json()
    rid = response.headers["x-request-id"]
    body["errors"] = [{**e, "message": strip_request_id(e["message"], rid)} for e in body["errors"]]
    return body
