"""KVCacheManager: exact block ids, reference counts, free-queue order, prefix-cache hits and evictions.

Expected hashes are computed here by hand with hashlib from the documented encoding (parent + key + <int64 tokens).
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from airun.engine.kv_manager import KVCacheManager, hash_block
from airun.engine.sequence import Sequence
from airun.sampling_params import SamplingParams

BS = 4


def mk(rid: str, tokens: list[int], key: str | None = None) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), cache_key=key)


def ref_hash(parent: bytes, key: bytes, tokens: list[int]) -> bytes:
    """The reference encoding: parent digest (b"" first), b"\\x00" for no key or b"\\x01"+<u32 len>+utf8, <int64 ids."""
    return hashlib.sha256(parent + key + b"".join(t.to_bytes(8, "little", signed=True) for t in tokens)).digest()


NO_KEY = b"\x00"


def compute(kv: KVCacheManager, seq: Sequence, n: int | None = None) -> None:
    """Admits ``seq`` (with its prefix hit) and marks ``n`` more tokens (default: all) computed, as a step would."""
    blocks, cached = kv.get_computed_blocks(seq)
    seq.num_computed_tokens = cached
    n = len(seq.token_ids) - cached if n is None else n
    assert kv.allocate_slots(seq, n, blocks)
    seq.num_computed_tokens += n
    kv.cache_full_blocks(seq)


def test_hash_block_matches_reference_encoding() -> None:
    h0 = ref_hash(b"", NO_KEY, [1, 2, 3, 4])
    assert hash_block(None, None, [1, 2, 3, 4]) == h0
    assert hash_block(h0, None, [5, 6, 7, 8]) == ref_hash(h0, NO_KEY, [5, 6, 7, 8])
    key = b"\x01" + (6).to_bytes(4, "little") + "lora-1".encode()
    assert hash_block(None, "lora-1", [1, 2, 3, 4]) == ref_hash(b"", key, [1, 2, 3, 4])
    assert hash_block(None, "", [1]) == ref_hash(b"", b"\x01\x00\x00\x00\x00", [1])
    assert hash_block(None, "", [1]) != hash_block(None, None, [1])
    assert hash_block(None, None, [2**40]) == hashlib.sha256(b"\x00" + struct.pack("<q", 2**40)).digest()


def test_allocation_ids_and_growth() -> None:
    kv = KVCacheManager(8, BS)
    assert (kv.num_free_blocks, kv.num_used_blocks, kv.free_block_ids()) == (8, 0, list(range(8)))
    a, b = mk("a", list(range(6))), mk("b", list(range(100, 105)))
    assert kv.allocate_slots(a, 6) and a.block_table == [0, 1]
    assert kv.allocate_slots(b, 5) and b.block_table == [2, 3]
    assert [kv.ref_count(i) for i in range(8)] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (kv.num_free_blocks, kv.num_used_blocks, kv.free_block_ids()) == (4, 4, [4, 5, 6, 7])
    a.num_computed_tokens = 6
    a.append_token(6)
    assert kv.allocate_slots(a, 1) and a.block_table == [0, 1]  # 7 tokens still fit in 2 blocks
    a.num_computed_tokens = 7
    a.token_ids += [7, 8]
    assert kv.allocate_slots(a, 2) and a.block_table == [0, 1, 4]  # 9 tokens: a third block
    assert kv.free_block_ids() == [5, 6, 7]


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(12)))
    compute(kv, a)
    kv.free(a)  # a's blocks 0,1,2 (0,1,2 hashed) go to the tail: [3..7, 2, 1, 0]
    b = mk("b", list(range(8)) + list(range(50, 75)))  # 33 tokens: 9 blocks, 2 of them cached
    blocks, cached = kv.get_computed_blocks(b)
    assert (blocks, cached) == ([0, 1], 8)
    b.num_computed_tokens = cached
    before = kv.free_block_ids()
    assert not kv.allocate_slots(b, 25, blocks)
    assert b.block_table == [] and kv.free_block_ids() == before
    assert [kv.ref_count(i) for i in range(8)] == [0] * 8
    assert kv.cached_block(a.block_hashes[2]) == 2  # nothing evicted
    assert kv.allocate_slots(b, 24, blocks) and b.block_table == [0, 1, 3, 4, 5, 6, 7, 2]


def test_free_order_reverse_and_lru_reuse() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a, b, c = mk("a", list(range(12))), mk("b", list(range(8))), mk("c", list(range(20)))
    assert kv.allocate_slots(a, 12) and a.block_table == [0, 1, 2]
    assert kv.allocate_slots(b, 8) and b.block_table == [3, 4]
    kv.free(a)
    assert a.block_table == [] and kv.free_block_ids() == [5, 6, 7, 2, 1, 0]
    kv.free(b)
    assert kv.free_block_ids() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert kv.allocate_slots(c, 20) and c.block_table == [5, 6, 7, 2, 1]


def test_prefix_hit_shares_blocks() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(10)))
    compute(kv, a)  # 10 tokens: blocks [0, 1, 2], the first two full and cached
    h0 = ref_hash(b"", NO_KEY, [0, 1, 2, 3])
    h1 = ref_hash(h0, NO_KEY, [4, 5, 6, 7])
    assert a.block_table == [0, 1, 2] and a.block_hashes == [h0, h1]
    assert (kv.cached_block(h0), kv.cached_block(h1), kv.num_cached_blocks) == (0, 1, 2)

    b = mk("b", list(range(8)) + [70, 71, 72])
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    assert [kv.ref_count(i) for i in range(3)] == [1, 1, 1]  # the lookup touches nothing
    b.num_computed_tokens = 8
    assert kv.allocate_slots(b, 3, [0, 1])
    assert b.block_table == [0, 1, 3]
    assert [kv.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (21, 8)
    assert kv.hit_rate == pytest.approx(8 / 21)

    kv.free(a)  # shared blocks stay used; only a's own block 2 is freed
    assert [kv.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert kv.free_block_ids() == [4, 5, 6, 7, 2]


def test_exact_block_multiple_leaves_one_token() -> None:
    kv = KVCacheManager(8, BS)
    compute(kv, mk("a", list(range(8))))
    assert kv.get_computed_blocks(mk("b", list(range(8)))) == ([0], 4)
    assert kv.get_computed_blocks(mk("c", list(range(9)))) == ([0, 1], 8)
    assert kv.get_computed_blocks(mk("d", list(range(4)))) == ([], 0)


def test_cache_key_isolation() -> None:
    kv = KVCacheManager(8, BS)
    toks = list(range(9))
    compute(kv, mk("a", toks))
    assert kv.get_computed_blocks(mk("b", toks, key="lora-1")) == ([], 0)
    assert kv.get_computed_blocks(mk("c", toks, key="")) == ([], 0)
    compute(kv, mk("d", toks, key="lora-1"))  # its own blocks [3, 4, 5]; 3 and 4 cached under lora-1
    assert kv.get_computed_blocks(mk("e", toks, key="lora-1")) == ([3, 4], 8)
    assert kv.get_computed_blocks(mk("f", toks)) == ([0, 1], 8)
    assert kv.get_computed_blocks(mk("g", toks, key="lora-2")) == ([], 0)


def test_chained_hashes_differ_when_tokens_differ() -> None:
    a = mk("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0])
    b = mk("b", [1, 2, 3, 4, 5, 6, 7, 99, 9, 10, 11, 12, 0])  # block 1 differs, block 2 is equal
    kv = KVCacheManager(8, BS)
    compute(kv, a)
    compute(kv, b)
    assert a.block_hashes[0] == b.block_hashes[0]
    assert a.block_hashes[1] != b.block_hashes[1]
    assert a.block_hashes[2] != b.block_hashes[2]  # chained: same tokens, different history
    assert a.block_table == [0, 1, 2, 3] and b.block_table == [0, 4, 5, 6]
    assert (kv.cached_block(b.block_hashes[1]), kv.cached_block(b.block_hashes[2])) == (4, 5)


def test_hit_is_double_checked_against_stored_tokens() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(9)))
    compute(kv, a)
    # A sequence whose stored hashes claim a's blocks although its tokens differ (what a collision would look like).
    forged = mk("x", [0, 1, 2, 3, 40, 41, 42, 43, 44])
    forged.block_hashes = list(a.block_hashes)
    assert kv.get_computed_blocks(forged) == ([0], 4)


def test_duplicate_block_stays_uncached() -> None:
    kv = KVCacheManager(8, BS)
    a, b = mk("a", list(range(5))), mk("b", list(range(5)))
    assert kv.allocate_slots(a, 5) and kv.allocate_slots(b, 5)  # both computed without a hit: [0, 1] and [2, 3]
    a.num_computed_tokens = b.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    kv.cache_full_blocks(b)
    assert a.block_hashes == b.block_hashes
    assert kv.cached_block(a.block_hashes[0]) == 0 and kv.num_cached_blocks == 1
    kv.free(a)
    kv.free(b)
    assert kv.free_block_ids() == [4, 5, 6, 7, 1, 0, 3, 2]
    assert kv.get_computed_blocks(mk("c", list(range(6)))) == ([0], 4)


def test_revival_of_cached_free_block() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(9)))
    compute(kv, a)
    kv.free(a)
    assert kv.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert kv.num_free_blocks == 8 and kv.num_used_blocks == 0
    b = mk("b", list(range(8)) + [60, 61])
    blocks, cached = kv.get_computed_blocks(b)
    assert (blocks, cached) == ([0, 1], 8)
    b.num_computed_tokens = cached
    assert kv.allocate_slots(b, 2, blocks)
    assert b.block_table == [0, 1, 3]
    assert kv.free_block_ids() == [4, 5, 6, 7, 2]
    assert [kv.ref_count(i) for i in (0, 1, 3)] == [1, 1, 1] and kv.num_used_blocks == 3
    assert kv.cached_block(a.block_hashes[0]) == 0  # revived blocks keep their hash


def test_eviction_when_pool_runs_dry() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(13)))
    compute(kv, a)  # blocks [0, 1, 2, 3], 0..2 cached
    kv.free(a)
    assert kv.free_block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]
    c = mk("c", list(range(100, 124)))  # 6 blocks: 4..7, then 3 (uncached) and 2 (evicted: a's last full block)
    assert kv.allocate_slots(c, 24) and c.block_table == [4, 5, 6, 7, 3, 2]
    assert kv.cached_block(a.block_hashes[2]) is None
    assert kv.cached_block(a.block_hashes[1]) == 1 and kv.cached_block(a.block_hashes[0]) == 0
    assert kv.get_computed_blocks(mk("d", list(range(13)))) == ([0, 1], 8)


def test_cache_full_blocks_only_counts_computed_tokens() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(10)))
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 7
    kv.cache_full_blocks(a)
    assert len(a.block_hashes) == 1 and kv.num_cached_blocks == 1
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    assert len(a.block_hashes) == 2 and kv.num_cached_blocks == 2


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = mk("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    assert a.block_hashes == [] and kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(mk("b", list(range(9)))) == ([], 0)
    assert (kv.num_queried_tokens, kv.hit_rate) == (0, 0.0)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(8, BS)
    a = mk("a", list(range(9)))
    compute(kv, a)
    with pytest.raises(RuntimeError):
        kv.reset_prefix_cache()
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(mk("b", list(range(9)))) == ([], 0)
    assert kv.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
