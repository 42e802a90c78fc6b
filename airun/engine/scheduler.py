"""Continuous batching under a token budget: each step lets every sequence's computed tokens catch up with its known
tokens, as far as the budget, the sequence cap and the KV blocks allow.

A decode is the case ``len(token_ids) - num_computed_tokens == 1``; a prefill longer than the remaining budget is
computed in chunks over several steps; a prefix-cache hit simply starts ``num_computed_tokens`` above 0; a preempted
sequence restarts from ``num_computed_tokens == 0`` over its prompt and generated tokens (recompute).
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass

from airun.engine.kv_manager import KVCacheManager
from airun.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    """This step computes tokens ``[seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens)`` of ``seq``;
    its ``block_table`` already covers them. ``num_new_tokens >= 1``."""

    seq: Sequence
    num_new_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work. ``num_batched_tokens`` is the sum of ``num_new_tokens`` (at most ``max_num_batched_tokens``);
    ``preempted`` are the sequences sent back to waiting during this ``schedule()`` call."""

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int


class Scheduler:
    """Decides which tokens of which sequences each step computes.

    Invariants:
    - every sequence added and not finished is in exactly one of ``waiting`` (status WAITING, empty block table,
      ``num_computed_tokens == 0``) or ``running`` (status RUNNING);
    - ``running`` is in order of arrival (``arrival_time``, ties by admission), so ``running[-1]`` is the preemption
      victim; ``len(running) <= max_num_seqs``;
    - with ``max_loras_per_step`` set, the distinct non-None ``cache_key`` values among ``running`` never exceed it, so
      no step mixes more adapters than that.
    """

    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_loras_per_step: int | None = None
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if max_loras_per_step is not None and max_loras_per_step < 1:
            raise ValueError("max_loras_per_step must be >= 1 or None")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras_per_step = max_loras_per_step
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._by_id: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence at the back of ``waiting``. Its request id must be unique among unfinished ones."""
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        if not seq.token_ids:
            raise ValueError("a sequence needs at least one token")
        seq.status = SequenceStatus.WAITING
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling -----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Running sequences first (preempting the most recently arrived when blocks run out), then waiting ones in FIFO
        order. No waiting sequence is admitted in a step that preempted (its blocks would just be taken back)."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1

        if not preempted:
            budget = self._admit(budget, scheduled)
        return SchedulerOutput(scheduled, preempted, self.max_num_batched_tokens - budget)

    def _admit(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        """Admits waiting sequences in FIFO order; a sequence whose adapter would exceed ``max_loras_per_step`` keeps its
        place and is passed over. Stops at the first one the KV pool cannot hold. Returns the budget left."""
        keys = {s.cache_key for s in self.running if s.cache_key is not None}
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if (
                self.max_loras_per_step is not None
                and seq.cache_key is not None
                and seq.cache_key not in keys
                and len(keys) >= self.max_loras_per_step
            ):
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_cached = self.kv.get_computed_blocks(seq)
            previous_cached = seq.num_cached_tokens
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            num_new = min(len(seq.token_ids) - num_cached, budget)
            if not self.kv.allocate_slots(seq, num_new, computed_blocks):
                seq.num_computed_tokens = 0
                seq.num_cached_tokens = previous_cached
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_time)
            if seq.cache_key is not None:
                keys.add(seq.cache_key)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: frees the blocks, rewinds to no computed tokens, back to the front of ``waiting``."""
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Marks the scheduled tokens computed and registers the blocks they filled in the prefix cache. Sequences
        finished or aborted since ``schedule()`` are skipped."""
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(seq)

    # ---- ending ---------------------------------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Status FINISHED with ``reason``; its blocks are freed at once and it leaves the scheduler. Idempotent."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self._by_id.get(seq.request_id) is seq:
            del self._by_id[seq.request_id]

    def abort(self, request_id: str) -> Sequence | None:
        """Finishes the request with ABORT; None if it is unknown or already finished."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    def abort_all(self, reason: FinishReason) -> list[Sequence]:
        """Finishes every running then waiting sequence with ``reason`` (after a model-step fault); returns them."""
        seqs = list(self.running) + list(self.waiting)
        for seq in seqs:
            self.finish(seq, reason)
        return seqs
