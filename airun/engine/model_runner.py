"""The only place that builds tensors, owns the KV cache and calls the model and the sampler."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Sequence as Seq

import torch

from airun.engine.scheduler import ScheduledSeq, SchedulerOutput
from airun.engine.sequence import Sequence
from airun.layers import int4_vnni
from airun.layers.attention import PREFILL_AS_DECODE_MAX_CTX, AttentionMetadata
from airun.layers.sampler import Sampler, build_sampling_batch
from airun.model.llama import CausalLM


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def zeros_lazy(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, prefault: bool = False) -> torch.Tensor:
    """A zero tensor whose CPU memory is committed page by page on first write (an anonymous mapping), so an unused
    KV budget costs no resident memory; ``prefault`` writes every page now instead. Zeros, not garbage: attention
    multiplies masked-out values by 0."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1))
    t = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)
    if prefault:
        t.zero_()
    return t


ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64


def limit_onednn_primitive_cache(capacity: int = ONEDNN_PRIMITIVE_CACHE_CAPACITY) -> None:
    """Caps oneDNN's primitive cache (default 1,024 entries) unless the user set it. Every distinct matmul shape
    (batch rows, context length) creates a primitive that holds its own scratch memory; under continuous batching the
    shapes keep changing, and a full default cache held ~300 MiB more RSS on the demo model at 32 concurrent requests,
    growing over a server's life, for no measured speed gain over 32-64 entries. oneDNN reads the variable when it
    first creates a primitive, so this must run before the process's first CPU matmul in bf16."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


class ModelRunner:
    """Runs one scheduled step: builds the flat batch (decode tokens first, then prefill chunks), runs the model,
    samples one token for every sequence whose known tokens are all computed after this step.

    Invariant: ``k_caches[i]`` / ``v_caches[i]`` have shape ``[num_blocks, block_size, kv_heads, head_dim]`` and are the
    tensors bound to layer i's attention module.
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 prefault: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_caches = [zeros_lazy(shape, dtype, device, prefault) for _ in range(cfg.num_hidden_layers)]
        self.v_caches = [zeros_lazy(shape, dtype, device, prefault) for _ in range(cfg.num_hidden_layers)]
        for layer, k, v in zip(model.model.layers, self.k_caches, self.v_caches):
            layer.self_attn.k_cache = k
            layer.self_attn.v_cache = v
        self.sampler = Sampler()
        self.fault_hook = None  # a test-only callable run before each model step (fault injection)
        self.lora = None  # an airun.lora.LoRAManager when LoRA is enabled: told each row's adapter before a forward
        self.one_level_from: int | None = None  # EngineArgs.one_level_from

    def _slots(self, seq: Sequence, start: int, n: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, start + n)]

    def _block_tables(self, seqs: Seq[Sequence], num_blocks: int) -> torch.Tensor:
        rows = [s.block_table[:num_blocks] + [0] * (num_blocks - len(s.block_table[:num_blocks])) for s in seqs]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Returns input ids, positions, attention metadata and, per scheduled seq (in batch order), the flat index of
        its last token."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        decode = [s for s in scheduled if s.num_new_tokens == 1]
        prefill = [s for s in scheduled if s.num_new_tokens > 1]
        for s in decode + prefill:
            start = s.seq.num_computed_tokens
            n = s.num_new_tokens
            ids.extend(s.seq.token_ids[start : start + n])
            pos.extend(range(start, start + n))
            slots.extend(self._slots(s.seq, start, n))
            last.append(len(ids) - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode=len(decode),
            decode_block_tables=None,
            decode_mask=None,
            num_prefill_tokens=len(ids) - len(decode),
            prefill_block_tables=None,
            prefill_mask=None,
            prefill_pad_index=None,
        )
        if decode:
            ctx = torch.tensor([s.seq.num_computed_tokens + 1 for s in decode], dtype=torch.int64, device=dev)
            max_ctx = int(max(s.seq.num_computed_tokens + 1 for s in decode))
            nb = (max_ctx + bs - 1) // bs  # keys padded to whole blocks: few distinct shapes, masked beyond ctx
            meta.decode_block_tables = self._block_tables([s.seq for s in decode], nb)
            meta.decode_ctx_lens = ctx
            meta.decode_mask = (torch.arange(nb * bs, device=dev)[None, :] < ctx[:, None]).view(len(decode), 1, 1, -1)
        if prefill:
            mq = max(s.num_new_tokens for s in prefill)
            ends = [s.seq.num_computed_tokens + s.num_new_tokens for s in prefill]
            meta.prefill_num_seqs = len(prefill)
            meta.prefill_causal = all(s.seq.num_computed_tokens == 0 for s in prefill)
            if not meta.prefill_causal:  # keys come from the cache, padded to whole blocks and masked
                nb = (max(ends) + bs - 1) // bs
                meta.prefill_block_tables = self._block_tables([s.seq for s in prefill], nb)
                starts = torch.tensor([s.seq.num_computed_tokens for s in prefill], dtype=torch.int64, device=dev)
                qpos = starts[:, None] + torch.arange(mq, device=dev)[None, :]  # [P, mq] absolute query positions
                keys = torch.arange(nb * bs, device=dev)
                meta.prefill_mask = (keys[None, None, :] <= qpos[:, :, None]).unsqueeze(1)
            meta.prefill_max_q = mq
            pad = [b * mq + i for b, s in enumerate(prefill) for i in range(s.num_new_tokens)]
            meta.prefill_pad_index = torch.tensor(pad, dtype=torch.int64, device=dev)
            if dev.type == "cpu" and max(ends) <= PREFILL_AS_DECODE_MAX_CTX:
                tables = self._block_tables([s.seq for s in prefill], (max(ends) + bs - 1) // bs)
                counts = torch.tensor([s.num_new_tokens for s in prefill], dtype=torch.int64, device=dev)
                meta.prefill_token_tables = tables.repeat_interleave(counts, dim=0)
                meta.prefill_token_ctx = torch.tensor(pos[len(decode) :], dtype=torch.int64, device=dev) + 1
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(pos, dtype=torch.int64, device=dev)
        return input_ids, positions, meta, last

    @torch.inference_mode()
    def forward_logits(self, output: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Runs the model; returns the scheduled seqs that sample this step and their logits [N, vocab] (float32).
        A step of ``one_level_from`` sequences or more runs the VNNI kernels with one activation level (see
        :func:`airun.layers.int4_vnni.set_activation_levels`); the default of two is restored after it."""
        if self.one_level_from is None or len(output.scheduled) < self.one_level_from:
            return self._forward_logits(output)
        int4_vnni.set_activation_levels(1)
        try:
            return self._forward_logits(output)
        finally:
            int4_vnni.set_activation_levels(2)

    def _forward_logits(self, output: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        if self.fault_hook is not None:
            self.fault_hook()
        if self.lora is not None:  # rows of one adapter side by side: the LoRA layers batch them without gathers
            output.scheduled.sort(key=lambda s: self.lora.slot_of(s.seq.cache_key))
        decode = [s for s in output.scheduled if s.num_new_tokens == 1]
        prefill = [s for s in output.scheduled if s.num_new_tokens > 1]
        ordered = decode + prefill
        input_ids, positions, meta, last = self.prepare(output.scheduled)
        if self.lora is not None:
            self.lora.set_batch([(s.seq.cache_key, s.num_new_tokens) for s in ordered])
        hidden = self.model(input_ids, positions, meta)
        if self.lora is not None:
            self.lora.ctx.clear()  # a later forward outside this runner sees no adapter rather than a stale mapping
        sampling = [
            (s, i) for s, i in zip(ordered, last) if s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens
        ]
        if not sampling:
            return [], hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        idx = torch.tensor([i for _, i in sampling], dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))
        return [s for s, _ in sampling], logits

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Runs the step and samples; returns (sequence, new token id) for each sequence that samples."""
        sampled, logits = self.forward_logits(output)
        if not sampled:
            return []
        seqs = [s.seq for s in sampled]
        batch = build_sampling_batch(seqs, logits.shape[-1], self.device)
        tokens = self.sampler(logits, batch).tolist()
        return list(zip(seqs, tokens))
