"""Helpers for the quantization tests: teacher-forced logits of a whole token sequence through an engine's model
runner (prefill chunks against its paged KV cache), perplexity, and top-1 agreement."""

from __future__ import annotations

import math

import torch

from airun.engine.kv_manager import KVCacheManager
from airun.engine.llm_engine import LLMEngine
from airun.engine.model_runner import ModelRunner
from airun.engine.scheduler import ScheduledSeq
from airun.engine.sequence import Sequence
from airun.sampling_params import SamplingParams


def prompt_logits(runner: ModelRunner, kv: KVCacheManager, token_ids: list[int], chunk: int = 256) -> torch.Tensor:
    """float32 logits ``[len(token_ids), vocab]``; row ``i`` is the model's prediction after ``token_ids[: i + 1]``.

    The tokens go through ``runner.prepare`` and ``runner.model`` in prefill chunks of ``chunk`` tokens, each chunk
    attending to the KV cache the earlier chunks wrote, exactly as the scheduler's chunked prefill runs them; the KV
    blocks come from (and go back to) ``kv``, which must have room for the whole sequence."""
    seq = Sequence("teacher-forced", list(token_ids), SamplingParams(max_tokens=1))
    rows: list[torch.Tensor] = []
    try:
        for start in range(0, len(token_ids), chunk):
            n = min(chunk, len(token_ids) - start)
            if not kv.allocate_slots(seq, n):
                raise RuntimeError("KV cache too small for the sequence")
            input_ids, positions, meta, _ = runner.prepare([ScheduledSeq(seq, n)])
            with torch.inference_mode():
                hidden = runner.model(input_ids, positions, meta)
                rows.append(runner.model.compute_logits(hidden).float())
            seq.num_computed_tokens += n
    finally:
        kv.free(seq)
    return torch.cat(rows)


def engine_logits(engine: LLMEngine, token_ids: list[int], chunk: int = 256) -> torch.Tensor:
    """:func:`prompt_logits` through an idle engine's own runner and KV manager."""
    return prompt_logits(engine.runner, engine.kv, token_ids, chunk)


def perplexity(logits: torch.Tensor, token_ids: list[int]) -> float:
    """``exp(mean(-log p(token_{i+1} | tokens_{<=i})))`` over the ``len(token_ids) - 1`` predicted tokens."""
    targets = torch.tensor(token_ids[1:])
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return math.exp(-logp.gather(1, targets[:, None]).mean().item())


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of positions whose argmax equals the reference logits' argmax."""
    return (logits.argmax(-1) == reference.argmax(-1)).double().mean().item()
