"""``GET /metrics``: the engine's state in the Prometheus text format.

Invariant: every value is read from ``engine.stats()`` (the step loop's latest snapshot) or ``AppState`` at scrape
time, into a registry private to this app (several apps in one process never share or clash).
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from airun.server.state import AppState

router = APIRouter(tags=["Monitoring"])


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


def make_registry(state: AppState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(state))
    return registry


@router.get("/metrics", operation_id="metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
