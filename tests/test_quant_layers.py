"""Quantized linears: the quantizers against hand-computed values, both matmul paths (kernel and dequantize-per-tile)
against a float64 matmul of the weight written out from its definition, and the int4 CPU packed layout (every SIMD
level PyTorch dispatches to on x86, and packing in row chunks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from airun.layers import quant
from airun.layers.quant import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    cpu_int4_layout,
    int4_group_size,
    int4_supported,
    quantize_int4,
    quantize_int8,
)

ROOT = Path(__file__).resolve().parent.parent


def reference_int4(w: Int4Weight) -> np.ndarray:
    """``W[n, k] = scales[n, k // G] * codes[n, k] + mins[n, k // G]`` element by element, in float64."""
    codes, scales, mins = w.codes.numpy().astype(np.float64), w.scales.numpy(), w.mins.numpy()
    g = np.arange(codes.shape[1]) // w.group_size
    return scales[:, g] * codes + mins[:, g]


def bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).float().bfloat16().double().numpy()


def test_quantize_int8_hand_computed() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-127.0, 63.5, 1.0, 126.4]])
    q = quantize_int8(w)
    # row 0: scale 2/127; 1 / (2/127) = 63.5 -> 64 (ties to even), 0.5 -> 31.75 -> 32
    assert q.qweight.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], [-127, 64, 1, 126]]
    assert q.scales.tolist() == pytest.approx([2 / 127, 0.0, 1.0])


def test_quantize_int4_hand_computed() -> None:
    # one group of 32: values 0..15 spaced 0.1 apart from -0.8, then -0.8 repeated; scale = 1.5 / 15, min = -0.8
    row = [-0.8 + 0.1 * i for i in range(16)] + [-0.8] * 16
    w = torch.tensor([row, [3.0] * 32])
    q = quantize_int4(w, 32)
    assert q.codes[0].tolist() == list(range(16)) + [0] * 16
    assert q.codes[1].tolist() == [0] * 32  # a constant group: scale 0, min = the value
    assert q.scales[:, 0].tolist() == pytest.approx([0.1, 0.0])
    assert q.mins[:, 0].tolist() == pytest.approx([-0.8, 3.0])
    with pytest.raises(ValueError):
        quantize_int4(torch.zeros(2, 48), 32)


def test_group_size_and_shape_rules() -> None:
    assert int4_group_size(576, 128) == 64
    assert int4_group_size(4096, 128) == 128
    assert int4_group_size(48, 32) is None
    assert int4_supported(576, 576, 32, "cpu") and not int4_supported(24, 576, 32, "cpu")
    assert int4_supported(24, 576, 32, "cuda") and not int4_supported(576, 48, 32, "cuda")


@pytest.mark.parametrize("n,k,g", [(576, 576, 32), (960, 576, 64), (176, 128, 128), (48, 256, 256)])
def test_int4_linear_both_paths_match_the_weight_definition(n: int, k: int, g: int) -> None:
    """N = 176 and 48 leave a shorter last row block in the CPU layout (blocks of 64 or 32)."""
    gen = torch.Generator().manual_seed(n + k)
    w = Int4Weight(
        torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
        torch.rand(n, k // g, generator=gen) * 0.02,
        (torch.rand(n, k // g, generator=gen) - 0.5) * 0.2,
        g,
    )
    lin = Int4Linear(k, n, g)
    lin.load(w)
    # The layer stores scale and zero = min + 8 * scale in bfloat16: that rounding is the format's only loss.
    scale = bf16(w.scales.numpy().astype(np.float64))
    zero = bf16(w.mins.numpy() + 8.0 * w.scales.numpy())
    cols = np.arange(k) // g
    w_ref = (w.codes.numpy().astype(np.float64) - 8.0) * scale[:, cols] + zero[:, cols]
    assert np.abs(w_ref - reference_int4(w)).max() < 2e-3  # the bf16 rounding of scales moves weights this little
    np.testing.assert_allclose(lin.dequantize(torch.float64).numpy(), w_ref, rtol=1e-6, atol=1e-9)
    for m in (1, 7, quant.INT4_KERNEL_MAX_ROWS + 3):
        x = torch.randn(m, k, generator=gen)
        for dtype in (torch.bfloat16, torch.float32):
            y = lin(x.to(dtype))
            # Small batches run the kernel in bfloat16; large ones dequantize to the input dtype (float32 stays exact).
            exact_f32 = dtype == torch.float32 and m > quant.INT4_KERNEL_MAX_ROWS
            ref = (x.double().numpy() if exact_f32 else bf16(x.numpy())) @ w_ref.T
            err = np.abs(y.double().numpy() - ref).max() / np.abs(ref).max()
            assert y.dtype == dtype and y.shape == (m, n)
            assert err < (1e-5 if exact_f32 else 1e-2), (m, dtype, err)
    # 3-D input (batch, tokens, features) keeps its leading shape
    assert lin(torch.randn(2, 3, k).bfloat16()).shape == (2, 3, n)


@pytest.mark.parametrize("n,k", [(576, 576), (100, 64)])
def test_int8_linear_both_paths_match_the_weight_definition(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    w = Int8Weight(q, torch.rand(n, generator=gen) * 1e-3)
    lin = Int8Linear(k, n)
    lin.load_rows(0, Int8Weight(w.qweight[:40], w.scales[:40]))
    lin.load_rows(40, Int8Weight(w.qweight[40:], w.scales[40:]))
    w_ref = w.qweight.numpy().astype(np.float64) * bf16(w.scales.numpy().astype(np.float64))[:, None]
    np.testing.assert_allclose(lin.dequantize(torch.float64).numpy(), w_ref, rtol=1e-12)
    for m in (1, quant.INT8_KERNEL_MAX_ROWS, quant.INT8_KERNEL_MAX_ROWS + 1, 200):
        x = torch.randn(m, k, generator=gen)
        for dtype in (torch.bfloat16, torch.float32):
            y = lin(x.to(dtype))
            exact_f32 = dtype == torch.float32 and m > quant.INT8_KERNEL_MAX_ROWS  # the dequant path keeps float32
            ref = (x.double().numpy() if exact_f32 else bf16(x.numpy())) @ w_ref.T
            err = np.abs(y.double().numpy() - ref).max() / np.abs(ref).max()
            assert y.dtype == dtype and err < (1e-5 if exact_f32 else 1e-2), (m, dtype, err)
    with pytest.raises(ValueError):
        lin.load_rows(n - 1, Int8Weight(w.qweight[:2], w.scales[:2]))


def test_int4_weight_dequantize_matches_the_definition() -> None:
    w = quantize_int4(torch.randn(64, 128), 32)
    np.testing.assert_allclose(w.dequantize().numpy(), reference_int4(w), rtol=1e-6, atol=4e-7)


def test_cpu_layout_is_recognised_and_chunked_packing_equals_whole_packing() -> None:
    assert cpu_int4_layout() is not None
    n, k = quant.PACK_CHUNK_ROWS + 112, 64  # two chunks, the last ending in a shorter row block
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    lin = Int4Linear(k, n, 32)
    lin.load(Int4Weight(codes, torch.ones(n, 2), torch.zeros(n, 2), 32))
    assert torch.equal(lin.packed, whole)
    assert torch.equal(quant._unpack_cpu(whole, n, k, cpu_int4_layout()), codes)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_other_simd_levels_round_trip(capability: str) -> None:
    """PyTorch packs int4 differently per SIMD level; ATEN_CPU_CAPABILITY makes it dispatch to another one."""
    code = (
        "import torch; from airun.layers import quant as q\n"
        "print(torch.backends.cpu.get_cpu_capability(), q.cpu_int4_layout())\n"
        "w = q.quantize_int4(torch.randn(176, 128), 32); lin = q.Int4Linear(128, 176, 32); lin.load(w)\n"
        "x = torch.randn(q.INT4_KERNEL_MAX_ROWS + 1, 128)\n"
        "a, b = lin.kernel_matmul(x).float(), lin.dequant_matmul(x).float()\n"
        "assert (a - b).abs().max() <= 2e-2 * b.abs().max(), (a - b).abs().max()\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0].lower() == capability
    assert "Int4CpuLayout" in proc.stdout  # recognised, so the dequantize path ran and matched the kernel
