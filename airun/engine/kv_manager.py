"""The KV-cache block pool: block tables, reference counts, the prefix cache and its LRU free queue.

Pure bookkeeping over block ids; the tensors live in the model runner. A block is *used* while some sequence holds it
(``ref_count > 0``) and *free* otherwise. A free block may still be *cached*: it keeps the K/V of a full block of
tokens, registered under that block's chained hash, until the pool hands it out again (eviction).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from airun.engine.sequence import Sequence


def hash_block(parent: bytes | None, cache_key: str | None, token_ids: Seq[int]) -> bytes:
    """The chained hash of one full block: SHA-256 over ``parent`` (``b""`` for the first block), the encoded cache key
    and the block's token ids as little-endian int64.

    The cache key is encoded as ``b"\\x00"`` for None and ``b"\\x01" + len(utf8) as <u32 + utf8`` for a string, so None
    and ``""`` (and keys that are prefixes of each other) never encode alike. Because ``parent`` is the hash of the
    previous block, a block's hash covers every token before it and the cache key.
    """
    h = hashlib.sha256(parent or b"")
    if cache_key is None:
        h.update(b"\x00")
    else:
        key = cache_key.encode("utf-8")
        h.update(b"\x01" + struct.pack("<I", len(key)) + key)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of the pool.

    Invariants: ``block_hash`` is not None iff the prefix cache maps that hash to this block; then ``token_ids`` and
    ``cache_key`` are the tokens and key it was hashed from (checked on every hit against hash collisions).
    """

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    cache_key: str | None = None
    token_ids: tuple[int, ...] = ()


class KVCacheManager:
    """Hands out blocks to sequences and keeps the prefix cache.

    Invariants:
    - every block is either used (``ref_count > 0``, held in the ``block_table`` of ``ref_count`` sequences) or in the
      free queue (``ref_count == 0``), never both; the free queue is ordered least recently freed first;
    - ``_cached[h] == b`` iff ``blocks[b].block_hash == h``; a hash maps to at most one block;
    - with prefix caching off, no block is ever hashed or cached.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # request id -> number of leading blocks of its table already registered in (or found in) the prefix cache.
        self._num_registered: dict[str, int] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- state ----------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_count == 0``, cached or not."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ``ref_count > 0``."""
        return self.num_blocks - len(self._free)

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit tokens over queried tokens (0.0 before any query)."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def free_block_ids(self) -> list[int]:
        """The free queue, next block to hand out first."""
        return list(self._free)

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block registered under ``block_hash``, or None."""
        return self._cached.get(block_hash)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Extends ``seq.block_hashes`` to cover its first ``num_full_blocks`` full blocks and returns it.

        ``token_ids`` only ever grows, so hashes already stored stay valid (also across preemption)."""
        hashes = seq.block_hashes
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, seq.cache_key, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Prefix-cache lookup for a waiting sequence: the longest run of its leading full blocks found in the cache,
        as (block ids, number of tokens they hold).

        At least one token of ``seq.token_ids`` is always left to compute. Changes no reference counts. Counts
        ``len(seq.token_ids)`` queried tokens and the returned number of hit tokens.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        max_blocks = (len(seq.token_ids) - 1) // bs
        hashes = self._block_hashes(seq, max_blocks)
        found: list[int] = []
        for i in range(max_blocks):
            block_id = self._cached.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.cache_key != seq.cache_key or list(block.token_ids) != seq.token_ids[i * bs : (i + 1) * bs]:
                break  # a hash collision: never reuse K/V of other tokens
            found.append(block_id)
        num_tokens = len(found) * bs
        self.num_queried_tokens += len(seq.token_ids)
        self.num_hit_tokens += num_tokens
        return found, num_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers every block of ``seq`` that is full of computed tokens and not registered yet.

        Its hash goes into ``seq.block_hashes``; if another block already holds that hash, the existing mapping stays
        and this block stays uncached."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        start = self._num_registered.get(seq.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            h = hashes[i]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                block.cache_key = seq.cache_key
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self._cached[h] = block.block_id
        self._num_registered[seq.request_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Drops every cached hash. Only valid while no block is used (raises RuntimeError otherwise)."""
        if self.num_used_blocks:
            raise RuntimeError(f"reset_prefix_cache with {self.num_used_blocks} blocks still in use")
        for block in self.blocks:
            self._uncache(block)
        self._num_registered.clear()

    def _uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            block.cache_key = None
            block.token_ids = ()

    # ---- allocation -----------------------------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grows ``seq.block_table`` to cover ``seq.num_computed_tokens + num_new_tokens`` tokens.

        ``computed_blocks`` (from :meth:`get_computed_blocks`, for a sequence with an empty table) are appended first and
        touched (``ref_count += 1``, taken out of the free queue); the caller has already set ``seq.num_computed_tokens``
        to the tokens they hold. New blocks come from the head of the free queue, losing their cached hash.
        Returns False and changes nothing when there are not enough free blocks.
        """
        computed = computed_blocks or []
        if computed and (seq.block_table or seq.num_computed_tokens < len(computed) * self.block_size):
            raise ValueError("computed blocks are only added to an empty table, after num_computed_tokens counts them")
        num_tokens = seq.num_computed_tokens + num_new_tokens
        num_needed = -(-num_tokens // self.block_size) - len(seq.block_table) - len(computed)
        num_revived = sum(1 for b in computed if self.blocks[b].ref_count == 0)
        if max(num_needed, 0) > len(self._free) - num_revived:
            return False
        for block_id in computed:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if computed:
            self._num_registered[seq.request_id] = len(computed)
        for _ in range(num_needed):
            block_id, _none = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._uncache(block)
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Releases every block of ``seq``, last block first, so the tail of a sequence is evicted before its head.
        Empties ``seq.block_table``; ``seq.block_hashes`` stays (it depends on tokens only)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        self._num_registered.pop(seq.request_id, None)
