"""Which linears of a :class:`CausalLM` hold quantized weights (a :class:`QuantPlan`), and the load-time conversion
that fills them from the checkpoint stream without ever holding a full-precision copy of the model.

Policy (``EngineArgs.quantize``):

- ``"int8"`` / ``"int4"``: every decoder projection (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) in that
  format; ``lm_head`` in int8 (llama.cpp likewise keeps its output matrix above 4 bits), or int4 when a GGUF file
  already stores it in a 4-bit type. GGUF 4-bit tensors are repacked exactly; other tensors are quantized from their
  float (or dequantized) values, int4 by round-to-nearest per group of :data:`DEFAULT_INT4_GROUP` inputs
  (32 for GGUF files, whose 4-bit groups are 32).
- ``None`` (auto): a GGUF file loaded in a 16-bit dtype keeps each tensor's native precision class
  (:func:`airun.loader.gguf_quant.native_format`); in float32, and for safetensors checkpoints, nothing is quantized.
- ``"none"``: nothing is quantized (GGUF weights are dequantized to the model dtype).

Why the GGUF default is the quantized path: for the demo model (Q4_1 projections, Q8_0 tied embedding) in bfloat16 on
a 2-core AVX-512 CPU, one thread (``bench/quant_decode.py``), a decode step takes 12.9 ms at batch 1 and 25.2 ms at
batch 8, against 28.3 and 32.1 ms with the weights dequantized to bfloat16; a 512-token prefill takes 0.55 s against
0.45 s. Perplexity moves from 15.65 (float32) to 15.76 (+0.7%, ``tests/test_perplexity.py``).

Embeddings stay in the model dtype in every mode: a lookup reads a few rows, so quantizing them saves memory but no
time, and other components read ``embed_tokens.weight`` for the model's dtype and device. A module whose shape the int4
kernel of the device does not take falls back to int8. On CPUs with AVX-512 VNNI, int4 and int8 modules use airun's own
kernels (:class:`~airun.layers.int4_vnni.Int4VnniLinear`, :class:`~airun.layers.int8_vnni.Int8VnniLinear`), else
PyTorch's (:class:`~airun.layers.quant.Int4Linear`, :class:`~airun.layers.quant.Int8Linear`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from airun.errors import InvalidRequestError
from airun.layers.int4_vnni import Int4VnniLinear, vnni_supported
from airun.layers.int8_vnni import Int8VnniLinear, vnni8_supported
from airun.layers.quant import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    QuantFormat,
    int4_group_size,
    int4_supported,
    quantize_int4,
    quantize_int8,
    quantized_linear,
)
from airun.model.config import ModelConfig
from airun.model.llama import _FUSED, CausalLM

if TYPE_CHECKING:
    from airun.loader.source import ModelSource

log = logging.getLogger("airun.model")

QUANTIZE_CHOICES = ("int8", "int4", "none")
INT4_MODULES: tuple[type[nn.Module], ...] = (Int4Linear, Int4VnniLinear)  # what an int4 plan entry becomes
INT8_MODULES: tuple[type[nn.Module], ...] = (Int8Linear, Int8VnniLinear)  # what an int8 plan entry becomes
DEFAULT_INT4_GROUP = 32
GGUF_INT4_GROUP = 32
_PROJECTIONS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

Weight = torch.Tensor | Int4Weight


@dataclass(slots=True)
class QuantPlan:
    """Invariants: every key of ``formats`` is the path of a projection of :func:`linear_paths` (e.g.
    ``"model.layers.3.mlp.gate_up_proj"`` or ``"lm_head"``); modules absent from it stay float. ``native_gguf``: the
    weights come from :func:`airun.loader.gguf_quant.iter_gguf_native` (4-bit tensors as :class:`Int4Weight`)."""

    formats: dict[str, QuantFormat]
    group_size: int = DEFAULT_INT4_GROUP
    native_gguf: bool = False
    reason: str = ""

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        parts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items()))
        return f"{parts or 'no'} quantized linears (int4 group {self.group_size}; {self.reason})"


def linear_paths(cfg: ModelConfig) -> dict[str, list[str]]:
    """Module path of every quantizable linear -> the HF names of the checkpoint tensors it is made of."""
    out: dict[str, list[str]] = {}
    for i in range(cfg.num_hidden_layers):
        for parent, attr in _PROJECTIONS:
            base = f"model.layers.{i}.{parent}"
            out[f"{base}.{attr}"] = [f"{base}.{s}.weight" for s in _SHARDS.get(attr, (attr,))]
    out["lm_head"] = ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return out


def plan_from_float(cfg: ModelConfig, fmt: QuantFormat, group_size: int = DEFAULT_INT4_GROUP) -> QuantPlan:
    """Projections in ``fmt``, ``lm_head`` in int8, for a checkpoint of float weights."""
    formats: dict[str, QuantFormat] = {p: fmt for p in linear_paths(cfg)}
    formats["lm_head"] = "int8"
    return QuantPlan(formats, group_size, native_gguf=False, reason=f"--quantize {fmt}")


def plan_from_gguf(
    cfg: ModelConfig, native: dict[str, QuantFormat | None], override: QuantFormat | None = None
) -> QuantPlan:
    """The plan for a GGUF file whose tensors have the native formats ``native`` (HF name -> format or None).
    Without ``override`` a module keeps the lowest precision class all its tensors share (float if one of them is
    float, int8 if one is int8, else int4). With ``override``, projections take it and ``lm_head`` is int8 unless the
    file stores it in a 4-bit type."""
    formats: dict[str, QuantFormat] = {}
    for path, names in linear_paths(cfg).items():
        kinds = [native.get(n) for n in names]
        if override is not None:
            fmt: QuantFormat | None = override
            if path == "lm_head":
                fmt = "int4" if override == "int4" and kinds == ["int4"] else "int8"
        elif any(k is None for k in kinds):
            fmt = None
        else:
            fmt = "int8" if "int8" in kinds else "int4"
        if fmt is not None:
            formats[path] = fmt
    reason = f"--quantize {override}" if override else "GGUF native precision"
    return QuantPlan(formats, GGUF_INT4_GROUP, native_gguf=True, reason=reason)


def resolve_quant_plan(
    quantize: str | None, source: ModelSource, cfg: ModelConfig, dtype: torch.dtype
) -> QuantPlan | None:
    """The plan for ``EngineArgs.quantize`` (see the module docstring), or None when nothing is quantized.
    Raises InvalidRequestError for an unknown choice."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InvalidRequestError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")
    if quantize == "none":
        return None
    if source.kind == "gguf":
        if quantize is None and dtype == torch.float32:
            return None
        from airun.loader import gguf_quant

        native = gguf_quant.tensor_formats(source.path)
        plan = plan_from_gguf(cfg, native, quantize)  # type: ignore[arg-type]
        return plan if plan.formats else None
    if quantize is None:
        return None
    return plan_from_float(cfg, quantize)  # type: ignore[arg-type]


def _to_int8(value: Weight) -> Int8Weight:
    return quantize_int8(value.dequantize() if isinstance(value, Int4Weight) else value)


def _to_int4(value: Weight, group_size: int) -> Int4Weight:
    if isinstance(value, Int4Weight):
        if value.group_size == group_size:
            return value
        value = value.dequantize()
    return quantize_int4(value, group_size)


def _as_tensor(value: Weight) -> torch.Tensor:
    return value.dequantize() if isinstance(value, Int4Weight) else value


@dataclass(slots=True)
class _Target:
    """A quantized module being filled. ``done`` holds the row offsets of the shards received; int4 shards wait in
    ``staged`` until the module's rows are complete (the packed layout mixes rows of neighbouring shards)."""

    module: Int8Linear | Int8VnniLinear | Int4Linear | Int4VnniLinear
    done: set[int] = field(default_factory=set)
    rows: int = 0
    staged: list[tuple[int, Int4Weight]] = field(default_factory=list)


class QuantLoader:
    """Swaps the planned linears of ``model`` (still on ``meta``) for empty quantized modules, then converts their
    checkpoint tensors as they stream by (:meth:`intercept`) and passes every other tensor on unchanged.

    Invariant: at most one fused module's shards are held (as int4 codes, not floats) at a time per module, and no
    float copy outlives the conversion of its tensor."""

    def __init__(self, model: CausalLM, plan: QuantPlan, device: torch.device) -> None:
        self.model, self.plan = model, plan
        self.targets: dict[str, _Target] = {}
        backend = torch.device(device).type
        for path, fmt in plan.formats.items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, attr)
            if not isinstance(old, nn.Linear):
                raise TypeError(f"{path} is a {type(old).__name__}, not an nn.Linear")
            k, n = old.in_features, old.out_features
            group = int4_group_size(k, plan.group_size) or 0
            if fmt == "int4" and not int4_supported(n, k, group, backend):
                fmt = "int8"
            new: nn.Module
            if fmt == "int4" and backend == "cpu" and vnni_supported(n, k, group):
                new = Int4VnniLinear(k, n, group, "meta")
            elif fmt == "int8" and backend == "cpu" and vnni8_supported(n, k):
                new = Int8VnniLinear(k, n, "meta")
                new.float_output = path == "lm_head"  # logits in float32, without a bfloat16 rounding
            else:
                new = quantized_linear(fmt, k, n, "meta", group, backend)
            setattr(parent, attr, new)
            self.targets[path] = _Target(new)
        self.tie_head = model.config.tie_word_embeddings and "lm_head" in self.targets

    def _route(self, name: str) -> tuple[str, int]:
        """(module path, first row) of a checkpoint tensor name; the path of a non-quantized one is not a target."""
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in _FUSED and parts[2] == "weight":
            fused, idx = _FUSED[parts[1]]
            return f"{parts[0]}.{fused}", self.model._shard_slice(fused, idx)[0]
        return name.removesuffix(".weight"), 0

    def _accept(self, path: str, row: int, value: Weight) -> None:
        t = self.targets[path]
        mod = t.module
        n = value.shape[0]
        if tuple(value.shape)[1:] != (mod.in_features,) or row + n > mod.out_features or row in t.done:
            raise ValueError(f"checkpoint tensor for rows {row}.. of {path} has shape {tuple(value.shape)}, or repeats")
        t.done.add(row)
        t.rows += n
        if isinstance(mod, INT8_MODULES):
            mod.load_rows(row, _to_int8(value))
            return
        t.staged.append((row, _to_int4(value, mod.group_size)))
        if t.rows == mod.out_features:
            shards = [w for _, w in sorted(t.staged, key=lambda rw: rw[0])]
            t.staged.clear()
            if len(shards) == 1:
                mod.load(shards[0])
            else:
                mod.load(
                    Int4Weight(
                        torch.cat([w.codes for w in shards]),
                        torch.cat([w.scales for w in shards]),
                        torch.cat([w.mins for w in shards]),
                        mod.group_size,
                    )
                )

    def intercept(self, weights: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Consumes the tensors of quantized modules; yields the others (as float tensors) for ``load_weights``."""
        for name, value in weights:
            if name == "model.embed_tokens.weight" and self.tie_head:
                self._accept("lm_head", 0, value)
            elif name == "lm_head.weight" and self.tie_head:
                continue  # a tied checkpoint that also stores the head: the embedding is the source
            else:
                path, row = self._route(name)
                if path in self.targets:
                    self._accept(path, row, value)
                    continue
            yield name, _as_tensor(value)

    def finish(self) -> None:
        """Raises KeyError when a planned module did not receive all its rows."""
        missing = sorted(p for p, t in self.targets.items() if t.rows != t.module.out_features)
        if missing:
            raise KeyError(f"checkpoint is missing tensors of: {missing[:5]}{'...' if len(missing) > 5 else ''}")


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model`` (quantized weights included; each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN-packed weights have no data pointer
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


__all__ = [
    "DEFAULT_INT4_GROUP",
    "INT4_MODULES",
    "INT8_MODULES",
    "QUANTIZE_CHOICES",
    "Int4Linear",
    "Int8Linear",
    "QuantLoader",
    "QuantPlan",
    "linear_paths",
    "plan_from_float",
    "plan_from_gguf",
    "quantized_bytes",
    "resolve_quant_plan",
]
