"""Multi-LoRA linear layers: one forward pass serves rows of different adapters (and rows of none).

Each wrapped projection computes ``base(x)`` plus, for every row ``t`` whose adapter slot ``s(t)`` is not 0,
``(x[t] @ A[s(t)]) @ B[s(t)]`` where ``B`` already carries the adapter's scale. Adapter weights live in stacked tensors
with one entry per slot, ``max_loras + 1`` of them; slot 0 is all zeros and means "no adapter". Adapters are never
merged into the base weights, and the base module is held as is, so a quantized linear composes with this wrapper.

The projections of the decoder are fused (``qkv_proj`` = q|k|v rows, ``gate_up_proj`` = gate|up rows): a wrapper knows
its slices, shares one down-projection ``A`` (the ranks of its slices side by side) and keeps one up-projection ``B``
per slice, added into that slice of the output.

The rows of one step are grouped by slot once (:meth:`LoRAContext.set_runs`) and every wrapper reuses the grouping:
either one padded batched matmul over all groups (a gather of each adapter used, whatever the number of rows), or, when
groups are so uneven that padding would more than double the rows, one matmul pair per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from airun.model.config import ModelConfig

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
    """How the rows of one step map onto adapter slots (rows of slot 0 appear nowhere).

    Invariants: ``rows`` lists the row of every adapter row, grouped by slot in the order of ``slots`` (``sizes[g]``
    rows for group g, each group's rows ascending); ``targets`` is the union of the projections the step's adapters
    target. Padded mode (``pad_index`` set): group g's rows sit at ``[g * max_rows, g * max_rows + sizes[g])`` of
    ``pad_index`` (``[U * max_rows]``, pads repeat a row of the group) and ``valid`` picks them out of the flattened
    ``[U * max_rows]`` result (None when no group is padded). ``all_rows`` is True when one group covers every row of
    the step in order (``rows`` is ``0..T-1``).
    """

    num_tokens: int
    rows: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [U] int64
    slot_list: list[int]
    sizes: list[int]
    targets: frozenset[str]
    pad_index: torch.Tensor | None = None  # [U * max_rows] int64
    valid: torch.Tensor | None = None  # [N] int64
    max_rows: int = 0
    all_rows: bool = False


class LoRAContext:
    """The per-step row-to-slot mapping shared by every LoRA layer of one model. The model runner sets it before each
    forward (:meth:`set_runs`); ``batch`` is None when no row of the step has an adapter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.batch: LoRABatch | None = None
        self.num_tokens = 0

    def set_runs(self, runs: Sequence[tuple[int, int]], slot_targets: Mapping[int, frozenset[str]]) -> None:
        """``runs``: ``(slot, num_rows)`` for consecutive rows of the flat batch, in order. ``slot_targets``: the
        projections each non-zero slot's adapter targets."""
        groups: dict[int, list[int]] = {}
        row = 0
        for slot, n in runs:
            if slot:
                groups.setdefault(slot, []).extend(range(row, row + n))
            row += n
        self.num_tokens = row
        if not groups:
            self.batch = None
            return
        dev = self.device
        slot_list = list(groups)
        sizes = [len(groups[s]) for s in slot_list]
        flat = [r for s in slot_list for r in groups[s]]
        n, u, m = len(flat), len(slot_list), max(sizes)
        targets = frozenset().union(*(slot_targets[s] for s in slot_list))
        batch = LoRABatch(
            num_tokens=row,
            rows=torch.tensor(flat, dtype=torch.int64, device=dev),
            slots=torch.tensor(slot_list, dtype=torch.int64, device=dev),
            slot_list=slot_list,
            sizes=sizes,
            targets=targets,
            all_rows=(u == 1 and n == row),
        )
        if u * m <= 2 * n:
            pad: list[int] = []
            valid: list[int] = []
            for g, s in enumerate(slot_list):
                rs = groups[s]
                pad.extend(rs + [rs[0]] * (m - len(rs)))
                valid.extend(range(g * m, g * m + len(rs)))
            batch.pad_index = torch.tensor(pad, dtype=torch.int64, device=dev)
            batch.max_rows = m
            if u * m != n:
                batch.valid = torch.tensor(valid, dtype=torch.int64, device=dev)
        self.batch = batch

    def clear(self) -> None:
        self.batch = None
        self.num_tokens = 0


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
        s = len(self.slices)
        self.register_buffer(
            "lora_a", torch.zeros(max_loras + 1, in_features, s * max_rank, dtype=dtype, device=device), persistent=False
        )
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.ctx.batch
        if batch is None or not (self.slice_names & batch.targets):
            return out
        if batch.num_tokens != x.shape[0]:
            raise RuntimeError(f"LoRA batch covers {batch.num_tokens} rows, the forward has {x.shape[0]}")
        r = self.max_rank
        if batch.pad_index is not None:
            u, m = len(batch.slot_list), batch.max_rows
            xg = x if batch.all_rows else x.index_select(0, batch.pad_index)
            if u == 1:
                h = xg @ self.lora_a[batch.slot_list[0]]  # [N, S*r]
            else:
                h = torch.bmm(xg.view(u, m, -1), self.lora_a.index_select(0, batch.slots)).view(u * m, -1)
            for i, (name, off, rows) in enumerate(self.slices):
                if name not in batch.targets:
                    continue
                hi = h[:, i * r : (i + 1) * r]
                b = self.lora_b(i)
                if u == 1:
                    d = hi @ b[batch.slot_list[0]]
                else:
                    d = torch.bmm(hi.reshape(u, m, r), b.index_select(0, batch.slots)).view(u * m, rows)
                    if batch.valid is not None:
                        d = d.index_select(0, batch.valid)
                self._add(out, off, rows, d, batch)
            return out
        # Uneven groups: one matmul pair per group over its rows (sorted by slot), no padding.
        xs = x.index_select(0, batch.rows)
        hs: list[torch.Tensor] = []
        start = 0
        for slot, n in zip(batch.slot_list, batch.sizes):
            hs.append(xs[start : start + n] @ self.lora_a[slot])
            start += n
        for i, (name, off, rows) in enumerate(self.slices):
            if name not in batch.targets:
                continue
            b = self.lora_b(i)
            parts = [h[:, i * r : (i + 1) * r] @ b[slot] for h, slot in zip(hs, batch.slot_list)]
            self._add(out, off, rows, torch.cat(parts, dim=0), batch)
        return out

    @staticmethod
    def _add(out: torch.Tensor, off: int, rows: int, delta: torch.Tensor, batch: LoRABatch) -> None:
        dst = out if rows == out.shape[-1] else out[:, off : off + rows]
        if batch.all_rows:
            dst.add_(delta)
        else:
            dst.index_add_(0, batch.rows, delta)


def wrap_model(
    model: nn.Module, cfg: ModelConfig, ctx: LoRAContext, max_loras: int, max_rank: int
) -> list[dict[str, LoRALinear]]:
    """Swaps every fused projection of every decoder layer of ``model`` (a built, loaded ``CausalLM``) for a
    :class:`LoRALinear` around it. Returns, per layer, ``target name -> wrapper`` (q/k/v share one wrapper, as do
    gate/up). Idempotent: a layer already wrapped is wrapped no further."""
    emb = model.model.embed_tokens.weight
    dtype, device = emb.dtype, emb.device
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
