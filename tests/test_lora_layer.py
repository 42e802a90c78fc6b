"""The multi-LoRA linear layer against the per-row definition ``W x + scale * B (A x)``, computed row by row in float64
from the same random matrices, in every grouping mode of a step (padded batched, per-group, one adapter for all)."""

from __future__ import annotations

import pytest
import torch

from airun.layers.lora import LoRAContext, LoRALinear, fused_layout, target_shapes
from airun.model.config import ModelConfig

CFG = ModelConfig(model_type="mistral", vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MAX_LORAS, MAX_RANK = 3, 6


def make_adapters(seed: int) -> dict[int, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]]:
    """Per slot: (target -> (A [r, in], B [out, r])) and a scale. Slot 3 has rank 2 and only q/v/up."""
    g = torch.Generator().manual_seed(seed)
    shapes = target_shapes(CFG)
    out = {}
    for slot, (r, targets, scale) in {
        1: (6, list(shapes), 0.5),
        2: (4, list(shapes), 2.0),
        3: (2, ["q_proj", "v_proj", "up_proj"], 1.25),
    }.items():
        out[slot] = ({t: (torch.randn(r, shapes[t][0], generator=g), torch.randn(shapes[t][1], r, generator=g))
                      for t in targets}, scale)
    return out


def reference(x: torch.Tensor, w: torch.Tensor, slices, row_slots: list[int], adapters) -> torch.Tensor:
    x64, out = x.double(), (x.double() @ w.double().t())
    for t, slot in enumerate(row_slots):
        if slot == 0:
            continue
        weights, scale = adapters[slot]
        for name, off, rows in slices:
            if name in weights:
                a, b = weights[name]
                out[t, off : off + rows] += scale * (b.double() @ (a.double() @ x64[t]))
    return out


def build(attr: str, adapters):
    _, fan_in, slices = fused_layout(CFG)[attr]
    torch.manual_seed(7)
    base = torch.nn.Linear(fan_in, sum(r for _, _, r in slices), bias=False)
    ctx = LoRAContext(torch.device("cpu"))
    layer = LoRALinear(base, fan_in, slices, ctx, MAX_LORAS, MAX_RANK, torch.float32, torch.device("cpu"))
    for slot, (weights, scale) in adapters.items():
        layer.set_slot(slot, {k: v for k, v in weights.items() if k in layer.slice_names}, scale)
    targets = {slot: frozenset(w) for slot, (w, _) in adapters.items()}
    return layer, ctx, slices, targets


# (runs, expected mode, slots taken as a view of the stacked weights)
RUNS: dict[str, tuple[list[tuple[int, int]], str | None, bool]] = {
    "sorted decode, consecutive slots": ([(0, 2), (1, 1), (2, 1), (3, 1)], "block", True),
    "sorted decode, slots out of order": ([(2, 2), (1, 2), (3, 2)], "block", False),
    "unsorted decode": ([(1, 1), (2, 1), (0, 1), (3, 1), (2, 1), (1, 1), (3, 1), (0, 1)], "padded", False),
    "uneven segments, padded": ([(1, 3), (2, 2), (3, 3)], "padded", True),
    "one adapter in two places": ([(1, 1), (2, 1), (0, 3), (1, 4)], "padded", False),
    "prefill chunks, too uneven to pad": ([(2, 1), (0, 1), (1, 9), (3, 2), (0, 5)], "loop", False),
    "one adapter, every row": ([(2, 1), (2, 1), (2, 7)], "block", True),
    "one adapter, some rows": ([(0, 2), (3, 4), (0, 1)], "block", True),
    "no adapter": ([(0, 3), (0, 4)], None, False),
    "one row": ([(1, 1)], "block", True),
}


@pytest.mark.parametrize("attr", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
@pytest.mark.parametrize("case", list(RUNS))
def test_rows_get_their_own_adapter(attr: str, case: str) -> None:
    adapters = make_adapters(seed=3)
    layer, ctx, slices, targets = build(attr, adapters)
    runs = RUNS[case][0]
    row_slots = [s for s, n in runs for _ in range(n)]
    x = torch.randn(len(row_slots), layer.in_features, generator=torch.Generator().manual_seed(5))
    ctx.set_runs(runs, targets)
    got = layer(x)
    want = reference(x, layer.base.weight, slices, row_slots, adapters)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(RUNS))
def test_grouping_modes_are_the_ones_intended(case: str) -> None:
    runs, mode, view = RUNS[case]
    ctx = LoRAContext(torch.device("cpu"))
    ctx.set_runs(runs, {1: frozenset({"q_proj"}), 2: frozenset({"v_proj"}), 3: frozenset({"q_proj"})})
    if mode is None:
        assert ctx.batch is None
        return
    assert ctx.batch is not None and ctx.batch.mode == mode
    if mode != "loop":
        assert (ctx.batch.slot_range is not None) == view
    used = {s for s, n in runs if s}
    assert ctx.batch.targets == frozenset().union(*({"q_proj"} if s != 2 else {"v_proj"} for s in used))


def test_bfloat16_base_with_float32_updates() -> None:
    adapters = make_adapters(seed=6)
    _, fan_in, slices = fused_layout(CFG)["gate_up_proj"]
    base = torch.nn.Linear(fan_in, sum(r for _, _, r in slices), bias=False).to(torch.bfloat16)
    ctx = LoRAContext(torch.device("cpu"))
    layer = LoRALinear(base, fan_in, slices, ctx, MAX_LORAS, MAX_RANK, torch.float32, torch.device("cpu"))
    for slot, (weights, scale) in adapters.items():
        layer.set_slot(slot, {k: v for k, v in weights.items() if k in layer.slice_names}, scale)
    for runs, _, _ in RUNS.values():
        row_slots = [s for s, n in runs for _ in range(n)]
        x = torch.randn(len(row_slots), fan_in).to(torch.bfloat16)
        ctx.set_runs(runs, {slot: frozenset(w) for slot, (w, _) in adapters.items()})
        got = layer(x)
        assert got.dtype == torch.bfloat16
        want = reference(x.float(), base.weight.float(), slices, row_slots, adapters)
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=0.1)


def test_slot_rewrite_clears_what_the_new_adapter_does_not_target() -> None:
    adapters = make_adapters(seed=4)
    layer, ctx, slices, targets = build("qkv_proj", adapters)
    weights3, scale3 = adapters[3]
    layer.set_slot(1, {k: v for k, v in weights3.items() if k in layer.slice_names}, scale3)  # slot 1: q/v only now
    x = torch.randn(2, layer.in_features)
    ctx.set_runs([(1, 2)], {1: frozenset(weights3)})
    want = reference(x, layer.base.weight, slices, [3, 3], adapters)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_refuses_rank_above_max_and_slot_zero() -> None:
    layer, _, _, _ = build("o_proj", {})
    a, b = torch.zeros(MAX_RANK + 1, layer.in_features), torch.zeros(CFG.hidden_size, MAX_RANK + 1)
    with pytest.raises(ValueError):
        layer.set_slot(1, {"o_proj": (a, b)}, 1.0)
    with pytest.raises(ValueError):
        layer.set_slot(0, {}, 1.0)


def test_stale_batch_is_refused() -> None:
    layer, ctx, _, targets = build("o_proj", make_adapters(seed=1))
    ctx.set_runs([(1, 3)], targets)
    with pytest.raises(RuntimeError, match="rows"):
        layer(torch.randn(4, layer.in_features))


def test_wraps_a_quantized_linear_unchanged() -> None:
    # The wrapper adds the low-rank updates to whatever the base module computes: here airun's int8 linear, whose
    # own output must come back bit for bit on rows without an adapter.
    from airun.layers.quant import Int8Linear, quantize_int8

    adapters = make_adapters(seed=8)
    _, fan_in, slices = fused_layout(CFG)["qkv_proj"]
    rows = sum(r for _, _, r in slices)
    base = Int8Linear(fan_in, rows)
    base.load_rows(0, quantize_int8(torch.randn(rows, fan_in, generator=torch.Generator().manual_seed(2))))
    ctx = LoRAContext(torch.device("cpu"))
    layer = LoRALinear(base, fan_in, slices, ctx, MAX_LORAS, MAX_RANK, torch.float32, torch.device("cpu"))
    for slot, (weights, scale) in adapters.items():
        layer.set_slot(slot, {k: v for k, v in weights.items() if k in layer.slice_names}, scale)
    runs = [(0, 2), (1, 1), (2, 1), (3, 1), (0, 1)]
    row_slots = [s for s, n in runs for _ in range(n)]
    x = torch.randn(len(row_slots), fan_in).to(torch.bfloat16)
    ctx.set_runs(runs, {slot: frozenset(w) for slot, (w, _) in adapters.items()})
    got = layer(x)
    plain = base(x)
    for t, slot in enumerate(row_slots):
        if slot == 0:
            assert torch.equal(got[t], plain[t])
    zero_w = torch.zeros(rows, fan_in)
    delta = reference(x.float(), zero_w, slices, row_slots, adapters)  # the updates alone, in float64
    torch.testing.assert_close((got.double() - plain.double()), delta, rtol=2e-2, atol=0.25)
