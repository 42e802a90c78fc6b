"""Resident adapters: which adapter sits in which slot of the stacked LoRA weights, loaded on first use, LRU evicted."""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from airun.layers.lora import LoRAContext, LoRALinear, wrap_model
from airun.lora.adapter import DEFAULT_MAX_BYTES, DEFAULT_MAX_RANK, LoRAAdapter, load_adapter
from airun.model.config import ModelConfig

log = logging.getLogger("airun.lora")


class LoRAManager:
    """Owns the LoRA layers of one model and the assignment of adapters to their slots.

    Invariants:
    - ``_resident`` maps adapter key -> slot, least recently used first; its slots are distinct, in
      ``1..max_loras``, and ``_free`` holds exactly the other slots of that range. Slot 0 (no adapter) is always zero.
    - a resident key's slot holds that adapter's weights (``scale * B``) in every LoRA layer, zeros where it has none;
    - :meth:`activate` never evicts a key it is asked to keep; callers keep the adapters of running requests there,
      and the scheduler caps their number at ``max_loras``, so an adapter in use is never evicted.
    - host copies: ``_live`` finds any adapter object still referenced (requests hold theirs until they end) and
      ``_recent`` keeps the ``max_cpu_loras`` most recently acquired ones alive, so a key is loaded from disk only when
      no copy of it is left. :meth:`acquire` may run on any thread (the async engine loads adapters off the step
      loop); the host-copy maps are guarded by ``_host_lock``, the slots are touched only by the engine thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        max_loras: int,
        max_rank: int = DEFAULT_MAX_RANK,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_cpu_loras: int | None = None,
    ) -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError("max_loras and max_rank must be >= 1")
        self.cfg = cfg
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.max_cpu_loras = max(1, max_cpu_loras if max_cpu_loras is not None else max_loras)
        device = model.model.embed_tokens.weight.device
        self.ctx = LoRAContext(device)
        self.layers: list[dict[str, LoRALinear]] = wrap_model(model, cfg, self.ctx, max_loras, max_rank)
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._free: list[int] = list(range(max_loras, 0, -1))  # pop() hands out the lowest slot first
        self._slot_targets: dict[int, frozenset[str]] = {}
        self._live: weakref.WeakValueDictionary[str, LoRAAdapter] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._host_lock = threading.Lock()
        self.num_loads = 0  # adapters read from disk
        self.num_evictions = 0

    # ---- host copies ----------------------------------------------------------------------------------------------
    def acquire(self, key: str, path: Path) -> LoRAAdapter:
        """The adapter named ``key`` (content of the folder ``path``), read and validated on first use. The caller holds
        the returned object until its request ends. Raises InvalidAdapterError / FinetuneMissingFilesError."""
        with self._host_lock:
            adapter = self._live.get(key)
        if adapter is None:  # read outside the lock: two first uses of one key may both read it; one copy is kept
            loaded = load_adapter(Path(path), self.cfg, key, self.max_rank, self.max_bytes)
            with self._host_lock:
                adapter = self._live.get(key)
                if adapter is None:
                    adapter = self._live[key] = loaded
                    self.num_loads += 1
                    log.info("loaded LoRA adapter %s from %s (r=%d, %d projections)", key, path, loaded.config.r,
                             len(loaded.weights))
        with self._host_lock:
            self._recent[key] = adapter
            self._recent.move_to_end(key)
            while len(self._recent) > self.max_cpu_loras:
                self._recent.popitem(last=False)
        return adapter

    # ---- slots ----------------------------------------------------------------------------------------------------
    @property
    def resident(self) -> dict[str, int]:
        """Resident keys and their slots, least recently used first."""
        return dict(self._resident)

    def slot_of(self, key: str | None) -> int:
        """0 for None; the slot of a resident key (KeyError otherwise)."""
        return 0 if key is None else self._resident[key]

    def activate(self, keys: Iterable[str]) -> None:
        """Makes every adapter of ``keys`` resident and most recently used, evicting least recently used adapters not in
        ``keys``. Each key must have been acquired and its adapter still be referenced."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"{len(wanted)} adapters needed at once; at most {self.max_loras} fit (--max-loras)")
        for key in wanted:
            if key in self._resident:
                self._resident.move_to_end(key)
        keep = set(wanted)
        for key in wanted:
            if key in self._resident:
                continue
            adapter = self._live.get(key)
            if adapter is None:
                raise RuntimeError(f"LoRA adapter {key} was not acquired before its step")
            slot = self._free.pop() if self._free else self._evict(keep)
            self._write(slot, adapter)
            self._resident[key] = slot

    def _evict(self, keep: set[str]) -> int:
        for key in self._resident:
            if key not in keep:
                slot = self._resident.pop(key)
                self._slot_targets.pop(slot, None)
                self.num_evictions += 1
                log.debug("evicted LoRA adapter %s from slot %d", key, slot)
                return slot
        raise RuntimeError("no LoRA slot can be freed: every resident adapter is in use")

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        scale = adapter.config.scale
        for i, by_target in enumerate(self.layers):
            for wrapper in dict.fromkeys(by_target.values()):  # q/k/v share one wrapper, as do gate/up
                w = {t: adapter.weights[(i, t)] for t in wrapper.slice_names if (i, t) in adapter.weights}
                wrapper.set_slot(slot, w, scale)
        self._slot_targets[slot] = adapter.targets

    # ---- the step -------------------------------------------------------------------------------------------------
    def set_batch(self, runs: Sequence[tuple[str | None, int]]) -> None:
        """Tells the LoRA layers the adapter of each row of the next forward: ``runs`` are ``(key or None, rows)`` for
        consecutive rows of the flat batch. Every key must be resident."""
        self.ctx.set_runs([(self.slot_of(k), n) for k, n in runs], self._slot_targets)
