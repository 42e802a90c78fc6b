"""Per-request generation parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from airun.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops.

    Invariants (checked by :meth:`validate`): ``max_tokens >= 1``; ``temperature >= 0`` (0 means greedy);
    ``top_k == 0`` (off) or ``>= 1``; ``0 < top_p <= 1``; ``repetition_penalty > 0`` (1.0 is off);
    ``frequency_penalty`` / ``presence_penalty`` in [-2, 2] (0 is off).
    ``seed`` makes the random draws of this request a pure function of (seed, step, vocabulary), independent
    of which other requests share its batch.
    """

    max_tokens: int = 256
    temperature: float = 0.6
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Per-request vocabulary mask hook: a callable (generated token ids) -> allowed token ids or None.
    # Reserved for JSON mode and tool calls; None means every token is allowed.
    allowed_token_fn: object | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.repetition_penalty > 0.0):
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v!r}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
