"""Paged attention over a block-table KV cache, for a flat batch of decode tokens followed by prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from airun import native


@dataclass(slots=True)
class AttentionMetadata:
    """How the flat token batch of one step maps onto sequences and KV slots.

    Invariants:
    - Tokens ``[0, num_decode)`` are one query each, from distinct sequences ("decode group"); tokens
      ``[num_decode, T)`` are the query chunks of the prefill sequences, concatenated in order ("prefill group").
    - ``slot_mapping[t]`` is the KV slot (``block_id * block_size + offset``) where token t's K/V is written; K/V are
      written before attention reads them, so a token attends to itself.
    - For a sequence whose chunk ends at absolute position ``p`` (its context length is ``p + 1``), every key at
      positions ``<= p`` is in its block table.
    - ``prefill_causal`` implies every prefill chunk starts at position 0, so causal attention over the step's own
      k/v equals attention over the cache under ``prefill_mask``.
    """

    slot_mapping: torch.Tensor  # [T] int64
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] int64
    decode_mask: torch.Tensor | None  # [D, 1, 1, D_ctx] bool, True where a key is visible
    num_prefill_tokens: int
    prefill_block_tables: torch.Tensor | None  # [P, max_blocks] int64
    prefill_mask: torch.Tensor | None  # [P, 1, max_q, P_ctx] bool
    prefill_pad_index: torch.Tensor | None  # [num_prefill_tokens] int64: row of each prefill token in [P * max_q]
    prefill_num_seqs: int = 0
    prefill_max_q: int = 0
    prefill_causal: bool = False  # every prefill chunk starts at position 0: its keys are exactly its own tokens
    decode_ctx_lens: torch.Tensor | None = None  # [D] int64: context length of each decode token (its position + 1)
    # Short prefills (every chunk ends within PREFILL_AS_DECODE_MAX_CTX): each prefill token as a decode query over
    # the cache, for the native decode kernel. [num_prefill_tokens, max_blocks] int64 and [num_prefill_tokens] int64.
    prefill_token_tables: torch.Tensor | None = None
    prefill_token_ctx: torch.Tensor | None = None


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """[num_blocks, block_size, kvh, d] gathered by block tables -> [B, kvh, ctx, d]."""
    b = block_tables.shape[0]
    g = cache[block_tables]  # [B, max_blocks, block_size, kvh, d]
    g = g.view(b, -1, cache.shape[2], cache.shape[3])[:, :ctx]
    return g.transpose(1, 2)


def _gather_prefill_kv(k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    assert meta.prefill_mask is not None and meta.prefill_block_tables is not None
    ctx = meta.prefill_mask.shape[-1]
    return _gather_kv(k_cache, meta.prefill_block_tables, ctx), _gather_kv(v_cache, meta.prefill_block_tables, ctx)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, kvh, G*q_len... ] grouped-query attention without repeating K/V.

    q: [B, kvh, G, Q, d]; k, v: [B, kvh, C, d]; mask: [B, 1, Q, C] -> out [B, kvh, G, Q, d].
    """
    b, kvh, g, qn, d = q.shape
    s = torch.matmul(q.reshape(b, kvh, g * qn, d), k.transpose(-1, -2)).view(b, kvh, g, qn, -1)
    s = s.float().mul_(scale).masked_fill_(~mask.unsqueeze(1), float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p.view(b, kvh, g * qn, -1), v).view(b, kvh, g, qn, d)


# Context length up to which a prefill chunk's causal attention runs on the decode kernel (one query per token): at 2
# threads it beats PyTorch's flash SDPA ~3x on 41-token prompts and ~1.4x at 512, and loses from ~1,024.
PREFILL_AS_DECODE_MAX_CTX = 512


def _native_decode(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether airun's C++ decode kernel takes this step (CPU, float32 or bfloat16, head_dim 16, 32, 64, 128 or 256)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.dtype == k_cache.dtype
        and q.shape[-1] in (16, 32, 64, 128, 256)
        and k_cache.is_contiguous()
        and native.available()
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    cache_written: bool = False,
) -> torch.Tensor:
    """q [T, H, d], k/v [T, kvh, d] for the step's tokens -> attention output [T, H * d]. Writes k/v into their cache
    slots first, unless ``cache_written`` says the caller already did."""
    t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    if not cache_written:
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
    outs: list[torch.Tensor] = []
    nd = meta.num_decode
    if nd and meta.decode_ctx_lens is not None and _native_decode(q, k_cache):
        outs.append(torch.ops.airun_attn.decode(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                meta.decode_ctx_lens, scale))
    elif nd:
        ctx = meta.decode_mask.shape[-1]
        kd = _gather_kv(k_cache, meta.decode_block_tables, ctx)
        vd = _gather_kv(v_cache, meta.decode_block_tables, ctx)
        qd = q[:nd].view(nd, kvh, g, 1, d)
        od = _attend(qd, kd, vd, meta.decode_mask, scale)
        outs.append(od.reshape(nd, h * d))
    if meta.num_prefill_tokens and meta.prefill_token_ctx is not None and _native_decode(q, k_cache):
        # causal attention as one decode query per token over the cache: faster than SDPA up to ~512 positions
        outs.append(torch.ops.airun_attn.decode(q[nd:], k_cache, v_cache, meta.prefill_token_tables,
                                                meta.prefill_token_ctx, scale))
    elif meta.num_prefill_tokens:
        pn, mq = meta.prefill_num_seqs, meta.prefill_max_q
        qp_flat = q[nd:]
        if pn == 1:
            qp = qp_flat.view(1, mq, h, d)
        else:
            qp = qp_flat.new_zeros(pn * mq, h, d).index_copy_(0, meta.prefill_pad_index, qp_flat).view(pn, mq, h, d)
        qp = qp.permute(0, 2, 1, 3)  # [P, H, Q, d]
        if meta.prefill_causal:  # no gather, no mask: the kernel skips the blocks above the diagonal
            kc, vc = k[nd:], v[nd:]
            if pn > 1:  # padded rows of a shorter prompt are never visible to its real rows (keys <= query)
                kc = kc.new_zeros(pn * mq, kvh, d).index_copy_(0, meta.prefill_pad_index, kc)
                vc = vc.new_zeros(pn * mq, kvh, d).index_copy_(0, meta.prefill_pad_index, vc)
            kc = kc.view(pn, mq, kvh, d).transpose(1, 2)
            vc = vc.view(pn, mq, kvh, d).transpose(1, 2)
            op = F.scaled_dot_product_attention(qp, kc, vc, is_causal=True, scale=scale, enable_gqa=g > 1)
        elif mq >= 64:
            kp, vp = _gather_prefill_kv(k_cache, v_cache, meta)
            kr = kp.repeat_interleave(g, dim=1) if g > 1 else kp
            vr = vp.repeat_interleave(g, dim=1) if g > 1 else vp
            op = F.scaled_dot_product_attention(qp, kr, vr, attn_mask=meta.prefill_mask, scale=scale)
        else:
            kp, vp = _gather_prefill_kv(k_cache, v_cache, meta)
            op = _attend(qp.reshape(pn, kvh, g, mq, d), kp, vp, meta.prefill_mask, scale).view(pn, h, mq, d)
        op = op.permute(0, 2, 1, 3).reshape(pn * mq, h * d)
        outs.append(op if pn == 1 else op.index_select(0, meta.prefill_pad_index))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
