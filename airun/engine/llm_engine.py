"""The synchronous engine: requests in, incremental outputs out, one ``step()`` at a time.

Runs on one thread (the async engine's step-loop thread). Owns tokenization limits, detokenization and stop strings;
the engine core below it (scheduler, KV manager, model runner) sees token ids only.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from airun.engine.args import EngineArgs, default_threads
from airun.engine.kv_manager import KVCacheManager
from airun.engine.model_runner import ModelRunner, kv_bytes_per_block, limit_onednn_primitive_cache
from airun.engine.outputs import EngineStats, RequestOutput
from airun.engine.scheduler import Scheduler
from airun.engine.sequence import FinishReason, Sequence
from airun.errors import ContextLengthError, InvalidRequestError, LoRANotSupportedError
from airun.loader.source import ModelSource, iter_weights, load_model_config, resolve_source
from airun.model.config import ModelConfig
from airun.model.llama import build_model
from airun.model.quantize import resolve_quant_plan
from airun.sampling_params import SamplingParams
from airun.text.detokenizer import IncrementalDetokenizer
from airun.text.gguf_tokenizer import load_tokenizer_from_gguf
from airun.text.tokenizer import Tokenizer, load_tokenizer_from_folder

if TYPE_CHECKING:
    from airun.lora import AdapterResolver, LoRAAdapter, LoRAManager

log = logging.getLogger("airun.engine")

MAX_DEFAULT_CONTEXT = 32768


@dataclass(slots=True, eq=False)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    pending: str = ""  # decoded text held back because it may begin a stop string
    num_sent_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    lora: LoRAAdapter | None = None  # the request's adapter: holding it keeps its host copy alive until the request ends


class LLMEngine:
    """Invariant: every request in ``requests`` has its sequence in the scheduler (waiting or running) until the output
    with ``finished=True`` has been returned by ``step()`` or it was aborted; then it is gone from both."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        torch.set_num_threads(args.threads or default_threads())
        limit_onednn_primitive_cache()
        self.device = args.resolve_device()
        self.dtype = args.resolve_dtype(self.device)
        t0 = time.monotonic()
        cache_dir = Path(args.cache_dir) if args.cache_dir else None
        self.source: ModelSource = resolve_source(args.model, cache_dir=cache_dir, revision=args.revision)
        self.model_config: ModelConfig = load_model_config(self.source)
        self.tokenizer: Tokenizer = (
            load_tokenizer_from_gguf(self.source.path)
            if self.source.kind == "gguf"
            else load_tokenizer_from_folder(self.source.path)
        )
        cfg = self.model_config
        limit = cfg.context_limit
        self.max_model_len = min(args.max_model_len or min(limit, MAX_DEFAULT_CONTEXT), limit)
        if args.max_model_len and args.max_model_len > limit:
            what = "sliding window" if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings else "context"
            raise InvalidRequestError(f"max_model_len {args.max_model_len} exceeds the model's {what} of {limit} tokens")
        show = sys.stderr.isatty() if args.show_progress is None else args.show_progress
        plan = self.quant_plan = resolve_quant_plan(args.quantize, self.source, cfg, self.dtype)
        native = plan is not None and plan.native_gguf
        weights = iter_weights(self.source, cfg, show_progress=show, native_quant=native)
        self.model = build_model(cfg, weights, self.dtype, self.device, self.max_model_len, quant=plan)
        if plan is not None:
            log.info("weights: %s", plan.summary())
        self.lora, self.lora_resolver = self._init_lora(args, cfg)
        per_block = kv_bytes_per_block(self.model, args.block_size, self.dtype)
        num_blocks = max(1, args.kv_budget_bytes() // per_block)
        # A KV cache smaller than one full-length sequence still works (preemption), but never below a few blocks.
        num_blocks = max(num_blocks, 4)
        capacity = num_blocks * args.block_size
        if self.max_model_len > capacity:
            if args.max_model_len:
                raise InvalidRequestError(
                    f"max_model_len {args.max_model_len} needs more KV cache than the budget holds ({capacity} tokens); "
                    "raise --kv-cache-memory-gb or lower --max-model-len"
                )
            log.warning("context capped at %d tokens by the KV-cache budget", capacity)
            self.max_model_len = capacity
        self.kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, args.max_num_seqs, args.max_num_batched_tokens, self._loras_per_step())
        self.runner = ModelRunner(self.model, num_blocks, args.block_size, self.dtype, self.device,
                                  prefault=args.kv_cache_prefault)
        self.runner.lora = self.lora
        self.runner.one_level_from = args.one_level_from
        self.requests: dict[str, _Request] = {}
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
        self.stats_prompt_tokens = 0
        self.stats_generation_tokens = 0
        self.load_seconds = time.monotonic() - t0
        log.info(
            "loaded %s (%s, %s) in %.1fs; KV cache %d blocks x %d tokens; context %d",
            self.source.name, self.dtype, self.device, self.load_seconds, num_blocks, args.block_size, self.max_model_len,
        )

    # ---- LoRA -----------------------------------------------------------------------------------------------------
    def _init_lora(
        self, args: EngineArgs, cfg: ModelConfig
    ) -> tuple[LoRAManager | None, AdapterResolver | None]:
        """With ``enable_lora``: wraps the model's projections in LoRA layers (a LoRAManager) and builds the resolver
        of adapter names (``lora_modules``, then the fine-tune registry of ``data_dir``). Else (None, None)."""
        if not args.enable_lora:
            return None, None
        from airun.lora import AdapterResolver, FinetuneRegistry, LoRAManager, default_data_dir

        manager = LoRAManager(self.model, cfg, args.max_loras, args.max_lora_rank)
        registry = FinetuneRegistry(Path(args.data_dir) if args.data_dir else default_data_dir(), args.max_lora_rank)
        return manager, AdapterResolver(args.lora_modules, registry)

    def _loras_per_step(self) -> int | None:
        """The scheduler's cap on distinct adapters per step: never more than the LoRA slots."""
        cap = self.args.max_loras_per_step
        if self.lora is None:
            return cap
        return min(cap, self.args.max_loras) if cap else self.args.max_loras

    def acquire_lora(self, lora: str) -> tuple[str, LoRAAdapter]:
        """(cache key, LoRAAdapter) of a request's ``lora``, read from disk on first use; safe on any thread. Raises
        LoRANotSupportedError (5005), FinetuneNotFoundError (3037), FinetuneMissingFilesError (3039) or
        InvalidAdapterError."""
        if self.lora is None or self.lora_resolver is None:
            raise LoRANotSupportedError(self.source.name)
        key, path = self.lora_resolver.resolve(lora)
        return key, self.lora.acquire(key, path)

    # ---- requests -------------------------------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Raises InvalidRequestError / ContextLengthError for a request that cannot be served; reads no mutable state."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or isinstance(t, bool) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        sampling.validate()
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            detail = ""
            if self.model_config.sliding_window and self.max_model_len == self.model_config.sliding_window:
                detail = "(the model's sliding window limits its context)"
            raise ContextLengthError(total, self.max_model_len, detail)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_key: str | None = None,
        adapter: LoRAAdapter | None = None,
    ) -> None:
        """Validates and queues a request. ``cache_key`` is a LoRA adapter's name or fine-tune id, or with ``adapter``
        (from :meth:`acquire_lora`) its content key. Raises InvalidRequestError / ContextLengthError (and the errors
        of :meth:`acquire_lora`); queues nothing then."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, sampling)
        if cache_key is not None and adapter is None:  # a name or fine-tune id -> its content key, loaded on first use
            cache_key, adapter = self.acquire_lora(cache_key)
        if sampling.seed is None:
            sampling.seed = secrets.randbits(63)
        seq = Sequence(request_id, list(prompt_token_ids), sampling, cache_key=cache_key)
        self.requests[request_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer))
        self.requests[request_id].lora = adapter
        self.scheduler.add(seq)
        self.stats_prompt_tokens += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends the request at once and frees its KV blocks; returns its final output (finish reason "abort"), or None
        if it is unknown (already finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        seq = req.seq
        return RequestOutput(request_id, req.pending, [], True, FinishReason.ABORT.value, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_tokens)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules, runs the model and returns the new output of every request that advanced or finished."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        scheduled_at = time.monotonic()
        for item in out.scheduled:
            sched = self.requests.get(item.seq.request_id)
            if sched is not None and sched.first_scheduled_time is None:
                sched.first_scheduled_time = scheduled_at
        if self.lora is not None:  # the adapters of running requests stay resident (at most max_loras of them)
            self.lora.activate(s.cache_key for s in self.scheduler.running if s.cache_key is not None)
        sampled = self.runner.execute(out)
        self.scheduler.update_after_step(out)
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for seq, token in sampled:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            seq.append_token(token)
            self.stats_generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._check_finish(seq, token)
            outputs.append(self._emit(req, reason))
        return outputs

    def _check_finish(self, seq: Sequence, token: int) -> FinishReason | None:
        sp = seq.sampling
        if (token in self.eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _emit(self, req: _Request, reason: FinishReason | None) -> RequestOutput:
        seq = req.seq
        new_ids = seq.output_token_ids[req.num_sent_tokens :]
        text = req.pending + req.detok.add_tokens(new_ids)
        if reason is not None:
            text += req.detok.flush()
        stops = seq.sampling.stop
        if stops:
            hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                text, reason = text[:hit], FinishReason.STOP
                req.pending = ""
            elif reason is None:
                hold = max(map(len, stops)) - 1
                cut = _holdback(text, stops, hold)
                text, req.pending = text[:cut], text[cut:]
        req.num_sent_tokens = seq.num_output_tokens
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=new_ids,
            finished=reason is not None,
            finish_reason=None if reason is None else reason.value,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=req.arrival,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            time=time.monotonic(),
        )

    def fail_all(self, error: str) -> list[RequestOutput]:
        """After a model-step fault: ends every request with an error and resets the KV state."""
        outputs = []
        for rid, req in list(self.requests.items()):
            seq = req.seq
            outputs.append(
                RequestOutput(rid, "", [], True, FinishReason.ERROR.value, seq.num_prompt_tokens,
                              seq.num_output_tokens, error=error)
            )
        self.scheduler.abort_all(FinishReason.ERROR)
        self.requests.clear()
        self.kv.reset_prefix_cache()
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            prefix_cache_queries=self.kv.num_queried_tokens,
            prefix_cache_hits=self.kv.num_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.stats_prompt_tokens,
            generation_tokens_total=self.stats_generation_tokens,
        )


def _holdback(text: str, stops: list[str], hold: int) -> int:
    """The index up to which ``text`` can be emitted: a suffix that could begin a stop string is held back."""
    start = max(0, len(text) - hold)
    for i in range(start, len(text)):
        tail = text[i:]
        if any(s.startswith(tail) for s in stops):
            return i
    return len(text)
