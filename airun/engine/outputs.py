"""What the engine hands back to its callers for each request and step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutput:
    """One increment of a request's output. ``text`` and ``token_ids`` are deltas since the previous output;
    the concatenation of all ``text`` deltas equals the decode of all generated tokens (minus a stop string)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    error: str | None = None
    # time.monotonic() stamps of the step loop (None where unknown, e.g. abort and error outputs): when the engine
    # queued the request, first scheduled it, produced its first token, and produced this output.
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time: float | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
