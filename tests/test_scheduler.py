"""Scheduler: token budget, chunked prefill, decode/prefill mixing, caps, preemption by recompute, adapters, aborts.

Steps are simulated without a model: schedule(), update_after_step(), then one token is appended to every sequence whose
known tokens are all computed (what sampling does). A shadow KV store checks that every computed position of every
running sequence holds that sequence's own (key, token, position) — the property the paged cache must keep.
"""

from __future__ import annotations

import random

from airun.engine.kv_manager import KVCacheManager
from airun.engine.scheduler import Scheduler, SchedulerOutput
from airun.engine.sequence import FinishReason, Sequence, SequenceStatus
from airun.sampling_params import SamplingParams

BS = 4


def mk(rid: str, tokens: list[int], key: str | None = None) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), cache_key=key)


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        assert s.num_new_tokens >= 1 and s.seq.status is SequenceStatus.RUNNING
        assert s.seq.num_computed_tokens + s.num_new_tokens <= len(s.seq.token_ids)
        assert len(s.seq.block_table) * BS >= s.seq.num_computed_tokens + s.num_new_tokens
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    if sched.max_loras_per_step is not None:
        assert len({s.seq.cache_key for s in out.scheduled} - {None}) <= sched.max_loras_per_step
    held = sum(len(s.block_table) for s in sched.running)
    refs = sum(sched.kv.ref_count(b) for b in range(sched.kv.num_blocks))
    assert refs == held and sched.kv.num_free_blocks + sched.kv.num_used_blocks == sched.kv.num_blocks


def step(sched: Scheduler, kv_store: dict[int, tuple] | None = None) -> SchedulerOutput:
    out = sched.schedule()
    check_invariants(sched, out)
    for s in out.scheduled:
        seq = s.seq
        if kv_store is not None:
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens):
                block = seq.block_table[p // BS]
                assert sched.kv.ref_count(block) == 1  # never write into a shared block
                kv_store[block * BS + p % BS] = (seq.cache_key, seq.token_ids[p], p)
    sched.update_after_step(out)
    for s in out.scheduled:
        if s.seq.num_computed_tokens == len(s.seq.token_ids):
            s.seq.append_token(1000 + len(s.seq.token_ids))
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def test_chunked_prefill_under_token_budget() -> None:
    sched = Scheduler(KVCacheManager(64, BS), max_num_seqs=8, max_num_batched_tokens=8)
    a = mk("a", list(range(20)))
    sched.add(a)
    assert plan(step(sched)) == [("a", 8)] and a.num_computed_tokens == 8 and len(a.block_table) == 2
    assert plan(step(sched)) == [("a", 8)] and a.num_computed_tokens == 16 and len(a.token_ids) == 20
    assert plan(step(sched)) == [("a", 4)] and a.num_computed_tokens == 20 and len(a.token_ids) == 21
    assert plan(step(sched)) == [("a", 1)] and len(a.block_table) == 6


def test_decode_and_prefill_mix_and_budget_split() -> None:
    sched = Scheduler(KVCacheManager(64, BS), max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = mk("a", [1, 2, 3]), mk("b", list(range(30, 42))), mk("c", list(range(50, 55)))
    sched.add(a)
    assert plan(step(sched)) == [("a", 3)]
    sched.add(b)
    sched.add(c)
    assert plan(step(sched)) == [("a", 1), ("b", 9)]  # c gets no budget this step and keeps waiting
    assert list(sched.waiting) == [c]
    assert plan(step(sched)) == [("a", 1), ("b", 3), ("c", 5)]
    assert plan(step(sched)) == [("a", 1), ("b", 1), ("c", 1)]


def test_max_num_seqs_cap() -> None:
    sched = Scheduler(KVCacheManager(64, BS), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [mk(f"s{i}", [i, i + 1, i + 2]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert plan(step(sched)) == [("s0", 3), ("s1", 3)] and list(sched.waiting) == [seqs[2]]
    assert plan(step(sched)) == [("s0", 1), ("s1", 1)]
    sched.finish(seqs[0], FinishReason.STOP)
    assert plan(step(sched)) == [("s1", 1), ("s2", 3)]
    assert sched.running == [seqs[1], seqs[2]]


def test_prefix_hit_on_admission() -> None:
    kv = KVCacheManager(64, BS)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    a = mk("a", list(range(10)))
    sched.add(a)
    step(sched)
    b, c = mk("b", list(range(8)) + [77, 78, 79]), mk("c", list(range(8)))
    sched.add(b)
    sched.add(c)
    out = step(sched)
    assert plan(out) == [("a", 1), ("b", 3), ("c", 4)]  # c is an exact block multiple: one block left to compute
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 4)
    assert b.block_table[:2] == a.block_table[:2] and c.block_table[0] == a.block_table[0]
    assert [kv.ref_count(x) for x in a.block_table[:2]] == [3, 2]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (10 + 11 + 8, 12)


def test_preemption_by_recompute_and_resume() -> None:
    kv = KVCacheManager(7, BS)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = mk("a", list(range(8))), mk("b", list(range(20, 28)))
    c = mk("c", list(range(40, 49)))
    for s in (a, b, c):
        sched.add(s)
    assert plan(step(sched)) == [("a", 8), ("b", 8), ("c", 9)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3], [4, 5, 6])
    d = mk("d", [90, 91])
    sched.add(d)

    out = step(sched)  # a needs a third block, none is free: c (the most recent) is preempted, a gets 6, b gets 5
    assert plan(out) == [("a", 1), ("b", 1)] and out.preempted == [c]
    assert list(sched.waiting) == [c, d] and sched.running == [a, b]
    assert (c.status, c.block_table, c.num_computed_tokens, c.num_preemptions) == (SequenceStatus.WAITING, [], 0, 1)
    assert len(c.token_ids) == 10 and sched.num_preemptions == 1  # its sampled token is kept
    assert (a.block_table, b.block_table, kv.free_block_ids()) == ([0, 1, 6], [2, 3, 5], [4])
    assert kv.cached_block(c.block_hashes[0]) == 4 and kv.cached_block(c.block_hashes[1]) is None

    out = step(sched)  # c would hit block 4 but needs 2 more blocks: admission stops, d keeps its place behind c
    assert plan(out) == [("a", 1), ("b", 1)] and out.preempted == []
    assert list(sched.waiting) == [c, d] and c.num_computed_tokens == 0 and c.block_table == []

    sched.finish(a, FinishReason.STOP)
    assert a.block_table == [] and kv.free_block_ids() == [4, 6, 1, 0]
    out = step(sched)
    assert plan(out) == [("b", 1), ("c", 6), ("d", 2)]
    assert (c.block_table, d.block_table, c.num_cached_tokens) == ([4, 6, 1], [0], 4)
    assert sched.running == [b, c, d] and not sched.waiting


def test_preempting_itself_when_it_is_the_most_recent() -> None:
    kv = KVCacheManager(3, BS)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = mk("a", list(range(5))), mk("b", list(range(10, 14)))
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [("a", 5), ("b", 4)]
    out = step(sched)  # b needs a second block; the only victim left is b itself
    assert plan(out) == [("a", 1)] and out.preempted == [b]
    assert list(sched.waiting) == [b] and kv.free_block_ids() == [2]


def test_max_loras_per_step() -> None:
    sched = Scheduler(KVCacheManager(64, BS), max_num_seqs=8, max_num_batched_tokens=100, max_loras_per_step=1)
    x, y, z, w = mk("x", [1, 2], "a"), mk("y", [3, 4], "b"), mk("z", [5, 6], "a"), mk("w", [7, 8])
    for s in (x, y, z, w):
        sched.add(s)
    assert plan(step(sched)) == [("x", 2), ("z", 2), ("w", 2)]
    assert list(sched.waiting) == [y]
    v = mk("v", [9], "c")
    sched.add(v)
    assert plan(step(sched)) == [("x", 1), ("z", 1), ("w", 1)] and list(sched.waiting) == [y, v]
    sched.finish(x, FinishReason.STOP)
    sched.finish(z, FinishReason.LENGTH)
    assert plan(step(sched)) == [("w", 1), ("y", 2)] and list(sched.waiting) == [v]


def test_abort_frees_blocks_at_once() -> None:
    kv = KVCacheManager(8, BS)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = mk("a", list(range(6))), mk("b", [1, 2])
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.block_table == [0, 1] and kv.num_used_blocks == 2
    assert sched.abort("a") is a
    assert (a.status, a.finish_reason, a.block_table) == (SequenceStatus.FINISHED, FinishReason.ABORT, [])
    assert kv.num_used_blocks == 0 and kv.free_block_ids() == [2, 3, 4, 5, 6, 7, 1, 0]
    assert sched.abort("a") is None and sched.abort("nope") is None
    assert sched.abort("b") is b and not sched.has_unfinished()


def test_abort_all_then_reset() -> None:
    kv = KVCacheManager(8, BS)
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [mk(f"s{i}", list(range(i, i + 5))) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched)
    ended = sched.abort_all(FinishReason.ERROR)
    assert ended == seqs and all(s.finish_reason is FinishReason.ERROR for s in seqs)
    assert kv.num_used_blocks == 0 and not sched.has_unfinished()
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0


def test_invariants_under_random_load() -> None:
    """Many sequences with shared prefixes, adapters and a small pool: every step keeps the invariants, every
    computed position holds its own token, and everything finishes with the pool empty."""
    rng = random.Random(0)
    kv = KVCacheManager(8, BS)  # the longest sequence (16 + 11 tokens) fits alone, not beside others
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, max_loras_per_step=2)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 10))] for _ in range(3)]
    budget_out: dict[str, int] = {}
    kv_store: dict[int, tuple] = {}
    pending = []
    for i in range(24):
        toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 8))]
        pending.append(mk(f"r{i}", toks, rng.choice([None, None, "a", "b", "c"])))
        budget_out[f"r{i}"] = rng.randrange(1, 12)
    steps = 0
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.7:
            sched.add(pending.pop(0))
        step(sched, kv_store)
        steps += 1
        assert steps < 2000
        for seq in list(sched.running):
            for p in range(seq.num_computed_tokens):
                assert kv_store[seq.block_table[p // BS] * BS + p % BS] == (seq.cache_key, seq.token_ids[p], p)
            if seq.num_output_tokens >= budget_out[seq.request_id]:
                sched.finish(seq, FinishReason.LENGTH)
        if rng.random() < 0.02 and sched.waiting:
            assert sched.abort(sched.waiting[-1].request_id) is not None
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 8
    assert sched.num_preemptions > 0 and kv.num_hit_tokens > 0
