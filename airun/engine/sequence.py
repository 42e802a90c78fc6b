"""One request's state inside the engine core."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from airun.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens, or the context window
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # the model step failed


@dataclass(slots=True, eq=False)
class Sequence:
    """A request as the scheduler and KV manager see it.

    Invariants:
    - ``token_ids`` = prompt tokens followed by generated tokens; ``num_prompt_tokens`` never changes.
    - ``0 <= num_computed_tokens <= len(token_ids)``: the first ``num_computed_tokens`` tokens have their K/V written
      into the blocks of ``block_table``. Preemption resets it to 0 and empties ``block_table`` (recompute).
    - ``block_table`` holds ``ceil(num_computed_tokens_after_step / block_size)`` blocks while running.
    - ``cache_key`` (an adapter id, or None for the base model) is part of every block hash of this sequence.
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    num_prompt_tokens: int = 0
    cache_key: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the full blocks of token_ids, in order
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens == 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
