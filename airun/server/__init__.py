"""The HTTP API: Workers AI REST routes, OpenAI-compatible routes, SSE, auth and errors (FastAPI + uvicorn).

``create_app(engine, settings)`` builds the app; ``airun serve`` (:mod:`airun.server.serve`) runs it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy, so that `airun --help` does not import FastAPI
    if name == "create_app":
        from airun.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from airun.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
