"""The server's shared state: the engine (once loaded), the settings and the served model's identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from airun.server.admission import Admission
from airun.server.catalog import ServedModel, default_served_name
from airun.server.errors import capacity_exceeded, internal_error
from airun.server.settings import ServerSettings

if TYPE_CHECKING:
    from airun.engine.async_engine import AsyncEngine


@dataclass(slots=True, eq=False)
class AppState:
    """Invariants: ``model`` is set exactly when ``engine`` is; ``ready`` means the engine's step loop has started and
    has not died; ``active_requests`` counts the generations in flight (streams included until they end)."""

    settings: ServerSettings
    engine: AsyncEngine | None = None
    model: ServedModel | None = None
    started: bool = False
    load_error: str | None = None
    active_requests: int = 0
    admission: Admission = field(default_factory=Admission)  # generation requests admitted, drain flag

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.started and not self.engine.is_dead

    def attach(self, engine: AsyncEngine) -> None:
        """Makes ``engine`` the one this server runs and names its model (``settings.served_model_name`` or the
        default derived from the checkpoint)."""
        self.engine = engine
        self.model = served_model_of(engine, self.settings)

    def require_engine(self) -> AsyncEngine:
        """The engine, or the 503 a client gets while it loads (3040, retry) or after it died (3001)."""
        engine = self.engine
        if engine is not None and engine.is_dead:
            raise internal_error(503)
        if engine is None or not self.started:
            if self.load_error is not None:
                raise internal_error(503)
            raise capacity_exceeded(retry_after_s=5, status=503)
        return engine


def served_model_of(engine: AsyncEngine, settings: ServerSettings) -> ServedModel:
    source = getattr(getattr(engine, "engine", None), "source", None)
    path: Path | None = getattr(source, "path", None)
    kind: str | None = getattr(source, "kind", None)
    name = settings.served_model_name or default_served_name(engine.model_name, path, kind, engine.model_config)
    return ServedModel(
        name=name,
        source_name=engine.model_name,
        model_type=engine.model_config.model_type,
        max_model_len=engine.max_model_len,
        supports_lora=settings.enable_lora,
    )


def app_state(request: Request) -> AppState:
    return request.app.state.airun
