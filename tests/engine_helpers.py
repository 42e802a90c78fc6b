"""Helpers for driving the synchronous engine in tests."""

from __future__ import annotations

from pathlib import Path

import torch

from airun.engine.args import EngineArgs
from airun.engine.llm_engine import LLMEngine
from airun.sampling_params import SamplingParams


def make_engine(model: Path | str, **kw: object) -> LLMEngine:
    defaults: dict[str, object] = dict(dtype="float32", show_progress=False, kv_cache_memory_gb=0.05)
    defaults.update(kw)
    return LLMEngine(EngineArgs(model=str(model), **defaults))  # type: ignore[arg-type]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=bool(kw.pop("ignore_eos", True)), **kw)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Submits all requests at once and steps until every one finishes; returns generated token ids by request id."""
    for rid, (ids, sp) in requests.items():
        engine.add_request(rid, ids, sp)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return out


class LogitsRecorder:
    """Records the float32 logits the engine computes, one [N, vocab] tensor per step (rows in sampling order)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.steps: list[torch.Tensor] = []
        self._handle = engine.model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.steps.append(output.detach().float().clone())

    def close(self) -> None:
        self._handle.remove()
