"""Multi-LoRA linear layers: one forward pass serves rows of different adapters (and rows of none).

Each wrapped projection computes ``base(x)`` plus, for every row ``t`` whose adapter slot ``s(t)`` is not 0,
``(x[t] @ A[s(t)]) @ B[s(t)]`` where ``B`` already carries the adapter's scale. Adapter weights live in stacked tensors
with one entry per slot, ``max_loras + 1`` of them; slot 0 is all zeros and means "no adapter". Adapters are never
merged into the base weights, and the base module is held as is, so a quantized linear composes with this wrapper.

The projections of the decoder are fused (``qkv_proj`` = q|k|v rows, ``gate_up_proj`` = gate|up rows): a wrapper knows
its slices, shares one down-projection ``A`` (the ranks of its slices side by side) and keeps one up-projection ``B``
per slice, added into that slice of the output.

The rows of one step are cut once (:meth:`LoRAContext.set_runs`) into runs of equal slot, which every wrapper reuses.
The model runner places the rows of one adapter side by side, so in the common case (decode steps) the adapter rows
are one block of equal runs: one batched matmul pair over a view of the input and of the stacked weights, no gather
and no scatter. Uneven runs are padded into such a batch (a gather and a scatter-add) when padding at most doubles the
rows, and otherwise get one matmul pair each. On a CPU with :mod:`airun.native`, one op (``airun/csrc/lora.cpp``)
applies the update of every layout instead, from the segments alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from airun import native
from airun.model.config import ModelConfig

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)

# The projections an adapter may target, by their Hugging Face names.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of every LoRA target projection of one decoder layer."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def fused_layout(cfg: ModelConfig) -> dict[str, tuple[str, int, list[tuple[str, int, int]]]]:
    """Per fused module of a decoder layer: ``attr -> (parent, in_features, [(target, row offset, rows)])``, where
    ``parent`` is ``"self_attn"`` or ``"mlp"`` and the slices tile the module's output rows in order."""
    shapes = target_shapes(cfg)

    def tiles(names: Sequence[str]) -> list[tuple[str, int, int]]:
        out, off = [], 0
        for n in names:
            out.append((n, off, shapes[n][1]))
            off += shapes[n][1]
        return out

    return {
        "qkv_proj": ("self_attn", cfg.hidden_size, tiles(["q_proj", "k_proj", "v_proj"])),
        "o_proj": ("self_attn", shapes["o_proj"][0], tiles(["o_proj"])),
        "gate_up_proj": ("mlp", cfg.hidden_size, tiles(["gate_proj", "up_proj"])),
        "down_proj": ("mlp", cfg.intermediate_size, tiles(["down_proj"])),
    }


@dataclass(slots=True)
class LoRABatch:
    """How the rows of one step map onto adapter slots.

    Invariants: ``segments`` are the maximal runs ``(slot, first row, rows)`` of equal non-zero slot, in row order
    (rows of slot 0 are in none); ``targets`` is the union of the projections the step's adapters target; ``mode``:

    - ``"block"``: the segments all have ``max_rows`` rows and follow each other without a gap from row ``start``, so
      the adapter rows are one ``[U, max_rows, in]`` view of the input;
    - ``"padded"``: ``pad_index`` (``[U * max_rows]``) gathers each segment's rows into a padded ``[U, max_rows, in]``
      batch (pads repeat a row of their segment), ``valid`` picks the real rows out of it (None when none is padding)
      and ``rows`` says where they go (``[N]``, segment order);
    - ``"loop"``: one matmul pair per segment (segments too uneven to pad).

    ``slot_range`` is ``(lo, hi)`` when the segments' slots are ``lo, lo + 1, ..., hi - 1`` in order (the stacked
    weights are then a view); otherwise ``slots`` (``[U]``) gathers them.
    """

    num_tokens: int
    targets: frozenset[str]
    segments: list[tuple[int, int, int]]
    mode: Literal["block", "padded", "loop"]
    max_rows: int
    start: int = 0
    slot_range: tuple[int, int] | None = None
    slots: torch.Tensor | None = None  # [U] int64
    pad_index: torch.Tensor | None = None  # [U * max_rows] int64
    valid: torch.Tensor | None = None  # [N] int64
    rows: torch.Tensor | None = None  # [N] int64
    flat_segments: list[int] = field(default_factory=list)  # the segments' (slot, first, rows), flattened


class LoRAContext:
    """The per-step row-to-slot mapping shared by every LoRA layer of one model. The model runner sets it before each
    forward (:meth:`set_runs`), with rows of one adapter placed side by side where it can; ``batch`` is None when no
    row of the step has an adapter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.batch: LoRABatch | None = None

    def set_runs(self, runs: Sequence[tuple[int, int]], slot_targets: Mapping[int, frozenset[str]]) -> None:
        """``runs``: ``(slot, num_rows)`` for consecutive rows of the flat batch, in order. ``slot_targets``: the
        projections each non-zero slot's adapter targets."""
        segments: list[tuple[int, int, int]] = []
        row = 0
        for slot, n in runs:
            if slot and n:
                if segments and segments[-1][0] == slot and segments[-1][1] + segments[-1][2] == row:
                    segments[-1] = (slot, segments[-1][1], segments[-1][2] + n)
                else:
                    segments.append((slot, row, n))
            row += n
        if not segments:
            self.batch = None
            return
        dev = self.device
        u = len(segments)
        m = max(n for _, _, n in segments)
        total = sum(n for _, _, n in segments)
        slot_list = [s for s, _, _ in segments]
        targets = frozenset().union(*(slot_targets[s] for s in set(slot_list)))
        lo = slot_list[0]
        consecutive = slot_list == list(range(lo, lo + u))
        mode: Literal["block", "padded", "loop"]
        if all(n == m and first == segments[0][1] + g * m for g, (_, first, n) in enumerate(segments)):
            mode = "block"
        elif u * m <= 2 * total:
            mode = "padded"
        else:
            mode = "loop"
        batch = LoRABatch(row, targets, segments, mode, m, start=segments[0][1])
        batch.flat_segments = [v for seg in segments for v in seg]
        if mode != "loop":
            if consecutive:
                batch.slot_range = (lo, lo + u)
            else:
                batch.slots = torch.tensor(slot_list, dtype=torch.int64, device=dev)
        if mode == "padded":
            pad: list[int] = []
            valid: list[int] = []
            for g, (_, first, n) in enumerate(segments):
                pad.extend(range(first, first + n))
                pad.extend([first] * (m - n))
                valid.extend(range(g * m, g * m + n))
            batch.pad_index = torch.tensor(pad, dtype=torch.int64, device=dev)
            flat = [r for _, f, n in segments for r in range(f, f + n)]
            batch.rows = torch.tensor(flat, dtype=torch.int64, device=dev)
            if u * m != total:
                batch.valid = torch.tensor(valid, dtype=torch.int64, device=dev)
        self.batch = batch

    def clear(self) -> None:
        self.batch = None


class LoRALinear(nn.Module):
    """``base`` plus per-row low-rank updates for the slices of a (possibly fused) projection.

    Invariants: ``lora_a`` is ``[max_loras + 1, in_features, S * max_rank]`` (S slices; slice i's rank columns at
    ``[i * max_rank, (i + 1) * max_rank)``) and ``lora_b[i]`` is ``[max_loras + 1, max_rank, rows_i]``; entry 0 of
    both is zero; an adapter of rank ``r < max_rank`` occupies the first ``r`` columns / rows and zeros the rest, so the
    padding adds exactly nothing.
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        slices: Sequence[tuple[str, int, int]],
        ctx: LoRAContext,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features = in_features
        self.slices = [(n, off, rows) for n, off, rows in slices]
        self.slice_names = frozenset(n for n, _, _ in slices)
        self.max_rank = max_rank
        self._updates_by_targets: dict[frozenset[str], list[tuple[int, int, int, str]]] = {}
        s = len(self.slices)
        a = torch.zeros(max_loras + 1, in_features, s * max_rank, dtype=dtype, device=device)
        self.register_buffer("lora_a", a, persistent=False)
        for i, (_, _, rows) in enumerate(self.slices):
            self.register_buffer(
                f"lora_b{i}", torch.zeros(max_loras + 1, max_rank, rows, dtype=dtype, device=device), persistent=False
            )

    def lora_b(self, i: int) -> torch.Tensor:
        return getattr(self, f"lora_b{i}")

    @torch.no_grad()
    def set_slot(self, slot: int, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        """Writes an adapter into ``slot`` (>= 1): ``weights[target] = (A [r, in], B [rows, r])`` as PEFT stores them;
        the stored B is ``scale * B``. Slices the adapter does not target are zeroed."""
        if slot < 1:
            raise ValueError("slot 0 is reserved for 'no adapter'")
        a = self.lora_a[slot]
        a.zero_()
        r_max = self.max_rank
        for i, (name, _, rows) in enumerate(self.slices):
            b = self.lora_b(i)[slot]
            b.zero_()
            if name not in weights:
                continue
            wa, wb = weights[name]
            r = wa.shape[0]
            if r > r_max or tuple(wa.shape) != (r, self.in_features) or tuple(wb.shape) != (rows, r):
                raise ValueError(f"{name}: LoRA shapes {tuple(wa.shape)}, {tuple(wb.shape)} do not fit this layer")
            a[:, i * r_max : i * r_max + r].copy_(wa.t())
            b[:r].copy_(wb.t().float() * scale)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        for i in range(len(self.slices)):
            self.lora_b(i)[slot].zero_()

    def _stack(self, t: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """``t`` (a stacked weight) for the batch's segments, in segment order: ``[U, ...]``."""
        if batch.slot_range is not None:
            return t[batch.slot_range[0] : batch.slot_range[1]]
        assert batch.slots is not None
        return t.index_select(0, batch.slots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.ctx.batch
        if batch is None or self.slice_names.isdisjoint(batch.targets):
            return out
        if batch.num_tokens != x.shape[0]:
            raise RuntimeError(f"LoRA batch covers {batch.num_tokens} rows, the forward has {x.shape[0]}")
        if (x.device.type == "cpu" and x.dtype == out.dtype and x.dtype in _NATIVE_DTYPES
                and self.lora_a.dtype in _NATIVE_DTYPES and x.is_contiguous() and out.is_contiguous()
                and native.available()):
            # one op for every layout, accumulating in float32, instead of ~10 small PyTorch ops per projection
            ups = self._updates(batch)
            torch.ops.airun_lora.apply(
                out, x, self.lora_a, [self._buffers[b] for _, _, _, b in ups], [i for i, _, _, _ in ups],
                [off for _, off, _, _ in ups], batch.flat_segments, self.max_rank,
            )
            return out
        if batch.mode == "block":
            self._block(x, out, batch)
        elif batch.mode == "padded":
            self._padded(x, out, batch)
        else:
            self._loop(x, out, batch)
        return out

    def _updates(self, batch: LoRABatch) -> list[tuple[int, int, int, str]]:
        """``(slice index, row offset, rows, buffer name of B)`` of the slices the batch's adapters target."""
        found = self._updates_by_targets.get(batch.targets)
        if found is None:
            found = [(i, off, rows, f"lora_b{i}") for i, (name, off, rows) in enumerate(self.slices)
                     if name in batch.targets]
            self._updates_by_targets[batch.targets] = found
        return found

    def _block(self, x: torch.Tensor, out: torch.Tensor, batch: LoRABatch) -> None:
        """The adapter rows are ``U`` consecutive runs of ``m`` rows: views in, in-place adds out."""
        r, u, m = self.max_rank, len(batch.segments), batch.max_rows
        lo, hi = batch.start, batch.start + u * m
        whole = lo == 0 and hi == out.shape[0]
        xs = (x if whole else x[lo:hi]).to(self.lora_a.dtype)
        dst = out if whole else out[lo:hi]
        single = len(self.slices) == 1
        if u == 1:  # one adapter: plain matmuls
            slot = batch.segments[0][0]
            h = xs @ self.lora_a[slot]
            for i, off, rows, b in self._updates(batch):
                d = (h if single else h[:, i * r : (i + 1) * r]) @ self._buffers[b][slot]  # type: ignore[index]
                (dst if single else dst[:, off : off + rows]).add_(d)
            return
        h = torch.bmm(xs.view(u, m, -1), self._stack(self.lora_a, batch))  # [U, m, S*r]
        dst3 = dst.view(u, m, -1)
        for i, off, rows, b in self._updates(batch):
            d = torch.bmm(h if single else h[:, :, i * r : (i + 1) * r], self._stack(self._buffers[b], batch))
            (dst3 if single else dst3[:, :, off : off + rows]).add_(d)

    def _padded(self, x: torch.Tensor, out: torch.Tensor, batch: LoRABatch) -> None:
        """Uneven runs gathered into a padded ``[U, m, in]`` batch; the real rows are scatter-added back."""
        assert batch.pad_index is not None and batch.rows is not None
        r, u, m = self.max_rank, len(batch.segments), batch.max_rows
        xg = x.index_select(0, batch.pad_index).to(self.lora_a.dtype).view(u, m, -1)
        h = torch.bmm(xg, self._stack(self.lora_a, batch))
        for i, off, rows, b in self._updates(batch):
            d = torch.bmm(h[:, :, i * r : (i + 1) * r], self._stack(self._buffers[b], batch)).view(u * m, rows)
            if batch.valid is not None:
                d = d.index_select(0, batch.valid)
            out[:, off : off + rows].index_add_(0, batch.rows, d.to(out.dtype))

    def _loop(self, x: torch.Tensor, out: torch.Tensor, batch: LoRABatch) -> None:
        """Runs too uneven to pad: one matmul pair per run."""
        r = self.max_rank
        updates = self._updates(batch)
        for slot, first, n in batch.segments:
            h = x[first : first + n].to(self.lora_a.dtype) @ self.lora_a[slot]
            for i, off, rows, b in updates:
                out[first : first + n, off : off + rows].add_(h[:, i * r : (i + 1) * r] @ self._buffers[b][slot])


def wrap_model(
    model: nn.Module, cfg: ModelConfig, ctx: LoRAContext, max_loras: int, max_rank: int
) -> list[dict[str, LoRALinear]]:
    """Swaps every fused projection of every decoder layer of ``model`` (a built, loaded ``CausalLM``) for a
    :class:`LoRALinear` around it. Returns, per layer, ``target name -> wrapper`` (q/k/v share one wrapper, as do
    gate/up). Idempotent: a layer already wrapped is wrapped no further.

    The adapter weights are in the model's dtype on accelerators, and on a CPU where :mod:`airun.native` runs every
    LoRA update (its op reads bfloat16 weights, accumulates in float32, and prefetches: with 16 adapters, a decode step
    streams every adapter's weights, and bfloat16 halves those bytes: 40 -> 28 us per projection measured on the demo
    model). Otherwise, on the CPU, they are float32: PyTorch's small bfloat16 matmuls are many times slower than
    float32 ones (the update is cast back as it is added)."""
    emb = model.model.embed_tokens.weight
    device = emb.device
    if device.type != "cpu" or (emb.dtype == torch.bfloat16 and native.available()):
        dtype = emb.dtype
    else:
        dtype = torch.float32
    layout = fused_layout(cfg)
    out: list[dict[str, LoRALinear]] = []
    for layer in model.model.layers:
        by_target: dict[str, LoRALinear] = {}
        for attr, (parent_name, in_features, slices) in layout.items():
            parent = getattr(layer, parent_name)
            mod = getattr(parent, attr)
            if not isinstance(mod, LoRALinear):
                mod = LoRALinear(mod, in_features, slices, ctx, max_loras, max_rank, dtype, device)
                setattr(parent, attr, mod)
            for name, _, _ in slices:
                by_target[name] = mod
        out.append(by_target)
    return out
