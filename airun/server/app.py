"""The FastAPI application: Workers AI and OpenAI-compatible routes around one AsyncEngine.

Invariants: the engine's step loop runs on its own thread, started by the app's lifespan and shut down with it;
``/health`` answers 200 only while the engine serves (503 while it loads and after it died); every other route sits
behind :class:`RequestContextMiddleware` (request id, bearer token, body limit) and answers errors in the Workers AI
envelope, unknown routes included.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

import airun
from airun.server import finetunes, metrics, openai_api, workers_ai
from airun.server.access_log import AccessLogMiddleware
from airun.server.admission import AdmissionMiddleware, engine_batch_capacity
from airun.server.errors import install_error_handlers
from airun.server.middleware import RequestContextMiddleware
from airun.server.openapi import install_openapi
from airun.server.settings import ServerSettings
from airun.server.state import AppState

if TYPE_CHECKING:
    from airun.engine.async_engine import AsyncEngine

log = logging.getLogger("airun.server")
STATIC_DIR = Path(airun.__file__).resolve().parent / "static"


def _add_playground(app: FastAPI) -> None:
    """``GET /`` serves the playground page and ``GET /<file>`` each file beside it (exact names only, so that every
    other path stays a 404 with the envelope)."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        return

    def serve(path: Path) -> Callable[[], Awaitable[FileResponse]]:
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".js":
            media = "text/javascript"

        async def handler() -> FileResponse:
            return FileResponse(path, media_type=media, headers={"cache-control": "no-cache"})

        return handler

    app.add_api_route("/", serve(index), methods=["GET"], include_in_schema=False)
    for f in sorted(STATIC_DIR.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            app.add_api_route("/" + f.relative_to(STATIC_DIR).as_posix(), serve(f), methods=["GET"],
                              include_in_schema=False)


def create_app(
    engine: AsyncEngine | None,
    settings: ServerSettings | None = None,
    *,
    loader: Callable[[], AsyncEngine] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app around ``engine``; or, with ``engine=None`` and a blocking ``loader``, an app that starts answering
    at once (``/health`` 503) and loads the engine on a worker thread, calling ``on_load_error`` if that fails."""
    settings = settings or ServerSettings()
    state = AppState(settings)
    if engine is not None:
        state.attach(engine)

    async def start(eng: AsyncEngine) -> None:
        eng.exit_on_error = settings.exit_on_engine_error
        state.admission.batch_capacity = engine_batch_capacity(eng)
        await eng.start()
        state.started = True
        assert state.model is not None
        log.info("serving %s as %s (context %d tokens)", eng.model_name, state.model.name, eng.max_model_len)

    async def load() -> None:
        assert loader is not None
        try:
            eng = await asyncio.to_thread(loader)
            state.attach(eng)
            await start(eng)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("the model could not be loaded: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = None
        if state.engine is not None:
            await start(state.engine)
        elif loader is not None:
            task = asyncio.create_task(load())
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            if state.engine is not None and state.started:
                state.started = False
                await state.engine.shutdown()

    app = FastAPI(
        title="airun",
        version=airun.__version__,
        description="A self-hosted Workers AI: the Workers AI REST API and an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.airun = state
    app.state.server_metrics = server_metrics = metrics.ServerMetrics(state)
    app.state.metrics_registry = server_metrics.registry
    app.state.admission = state.admission
    app.add_middleware(AdmissionMiddleware, admission=state.admission, settings=lambda: state.settings)
    app.add_middleware(RequestContextMiddleware, settings=lambda: state.settings)
    app.add_middleware(AccessLogMiddleware, state=state, metrics=server_metrics)  # outermost: runs first
    install_error_handlers(app)
    install_openapi(app, state)

    @app.get("/health", tags=["Monitoring"], operation_id="health",
             responses={503: {"description": "Loading, or the engine has stopped"}})
    async def health(request: Request) -> JSONResponse:
        if state.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.ready:
            assert state.model is not None
            return JSONResponse({"status": "ok", "model": state.model.name})
        dead = state.load_error is not None or (state.engine is not None and state.engine.is_dead)
        return JSONResponse({"status": "error" if dead else "loading"}, status_code=503)

    app.include_router(workers_ai.router)
    app.include_router(openai_api.router)
    app.include_router(metrics.router)
    app.include_router(finetunes.router)
    if settings.serve_playground:
        _add_playground(app)
    return app
