"""``GET /metrics``: the engine's state and the HTTP layer's request statistics in the Prometheus text format.

Invariants: every metric lives in a registry private to one app (several apps in one process never share or clash);
engine gauges and counters are read from ``engine.stats()`` (the step loop's latest snapshot) or ``AppState`` at scrape
time; label values are bounded: ``route`` is a route template (never a raw path), ``model`` is the served model's name
or ``""``. Latency histograms are engine-side (``time.monotonic`` stamps of the step loop, from the moment the engine
queued the request) and observed once per generation, except the inter-token latency: once per token after the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from airun.engine.outputs import RequestOutput
from airun.server.state import AppState

router = APIRouter(tags=["Monitoring"])

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
SCOPE_MODEL = "airun_model"  # keys the HTTP layer writes into ``scope["state"]`` for the access log and the counters
SCOPE_PROMPT_TOKENS = "airun_prompt_tokens"
SCOPE_COMPLETION_TOKENS = "airun_completion_tokens"


def loaded_adapters(engine: Any) -> int:
    """Resident LoRA adapters of ``engine`` (an AsyncEngine); 0 without a LoRA manager. Read-only, best effort."""
    lora = getattr(getattr(engine, "engine", None), "lora", None)
    if lora is None:
        return 0
    with contextlib.suppress(Exception):  # the step loop may mutate it meanwhile: a stale count beats a failed scrape
        return len(lora.resident)
    return 0


class EngineCollector(Collector):
    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.state
        yield GaugeMetricFamily("airun_ready", "1 when the model is loaded and serving", value=float(state.ready))
        yield GaugeMetricFamily("airun_http_generations_in_flight", "Generation requests the HTTP layer is serving",
                                value=float(state.active_requests))
        engine = state.engine
        if engine is None:
            return
        s = engine.stats()
        gauges = {
            "airun_num_requests_running": ("Requests running in the engine", s.num_running),
            "airun_num_requests_waiting": ("Requests waiting for admission", s.num_waiting),
            "airun_kv_blocks_used": ("KV-cache blocks held by requests", s.kv_blocks_used),
            "airun_kv_blocks_total": ("KV-cache blocks in the pool", s.kv_blocks_total),
            "airun_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use",
                                           s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0),
            "airun_prefix_cache_hit_rate": ("Prefix-cache hits per query", s.prefix_cache_hit_rate),
            "airun_max_model_len": ("Context window allowed (prompt + max_tokens)", engine.max_model_len),
            "airun_lora_adapters_loaded": ("LoRA adapters resident in their slots", loaded_adapters(engine)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = {
            "airun_num_preemptions": ("Sequences preempted (recomputed later)", s.num_preemptions),
            "airun_prompt_tokens": ("Prompt tokens admitted", s.prompt_tokens_total),
            "airun_generation_tokens": ("Tokens generated", s.generation_tokens_total),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """The app's metrics: the engine collector plus the HTTP request counter and the per-generation histograms."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(state))
        r = self.registry
        self.requests = Counter("airun_requests", "HTTP requests answered, by model, route template and status",
                                ["model", "route", "status"], registry=r)
        self.time_to_first_token = Histogram("airun_time_to_first_token_seconds",
                                             "From the engine queueing a request to its first token", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("airun_inter_token_latency_seconds",
                                             "Between consecutive tokens of one request", ["model"],
                                             buckets=ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram("airun_e2e_request_latency_seconds",
                                     "From the engine queueing a request to its last output (completed requests)",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("airun_request_queue_time_seconds",
                                    "From the engine queueing a request to its first scheduling", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)

    def observe_request(self, model: str, route: str, status: int) -> None:
        self.requests.labels(model=model, route=route, status=str(status)).inc()


def server_metrics(request: Request) -> ServerMetrics | None:
    return getattr(request.app.state, "server_metrics", None)


async def track_generation(request: Request, outputs: AsyncIterator[RequestOutput]
                           ) -> AsyncGenerator[RequestOutput, None]:
    """Yields ``outputs`` unchanged, observing the latency histograms and noting the model and the token counts in
    ``request.scope["state"]`` (for the access log). Closing it closes ``outputs`` (which aborts the engine request)."""
    metrics = server_metrics(request)
    state: AppState | None = getattr(request.app.state, "airun", None)
    model = state.model.name if state is not None and state.model is not None else ""
    note = request.scope.setdefault("state", {})
    note[SCOPE_MODEL] = model
    last_token_time: float | None = None
    try:
        async for out in outputs:
            note[SCOPE_PROMPT_TOKENS] = out.num_prompt_tokens
            note[SCOPE_COMPLETION_TOKENS] = out.num_output_tokens
            if metrics is not None:
                last_token_time = _observe(metrics, model, out, last_token_time)
            yield out
    finally:
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()


def _observe(m: ServerMetrics, model: str, out: RequestOutput, last_token_time: float | None) -> float | None:
    """Observes ``out``; returns the time of the latest token seen so far."""
    if out.arrival_time is None or out.time is None:
        return last_token_time
    n = len(out.token_ids)
    if n:
        if last_token_time is None:
            if out.first_token_time is not None:
                m.time_to_first_token.labels(model).observe(max(0.0, out.first_token_time - out.arrival_time))
            if out.first_scheduled_time is not None:
                m.queue_time.labels(model).observe(max(0.0, out.first_scheduled_time - out.arrival_time))
            n -= 1
            last_token_time = out.first_token_time if out.first_token_time is not None else out.time
        for _ in range(n):
            m.inter_token_latency.labels(model).observe(max(0.0, out.time - last_token_time) / n)
        last_token_time = out.time
    if out.finished and out.finish_reason in ("stop", "length"):
        m.e2e_latency.labels(model).observe(max(0.0, out.time - out.arrival_time))
    return last_token_time


@router.get("/metrics", operation_id="metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
