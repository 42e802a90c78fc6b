"""Group-wise int4 linears on airun's own AVX-512 VNNI kernel (``airun/csrc/int4_vnni.cpp``), for x86 CPUs that have it.

PyTorch's ``_weight_int4pack_mm_for_cpu`` reads int4 weights at about half the memory bandwidth, so a 4-bit 7B model
decodes at about half of llama.cpp's speed with it. This kernel works as ggml's Q4_0 x Q8_0 path does, with
finer activations: they are quantized to two int8 levels per block of 32 (error below bfloat16's; one level, as
ggml's, flips near-tied greedy tokens, and is used only in busy steps: :func:`set_activation_levels`), and each
weight block is a VNNI dot product of unsigned codes with them, sixteen output rows per instruction. Where
:func:`airun.native.available` is False (no C++ build, no AVX-512 VNNI, or ``AIRUN_NATIVE_KERNELS=0``), int4 layers
use :class:`~airun.layers.quant.Int4Linear` instead.

With two levels, rows above :data:`KERNEL_MAX_ROWS` (prefill) dequantize the weight tile by tile into the activation
dtype and run a dense GEMM, never holding a full-precision copy of the weight; with one (a busy step, see
:func:`set_activation_levels`), every row count runs the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from airun import native
from airun.layers.quant import DEQUANT_TILE_ELEMENTS, Int4Weight

ROWS_PER_TILE = 16
BLOCK = 32
TILE_BLOCK_BYTES = ROWS_PER_TILE * BLOCK // 2
PAIR_CODE_BYTES = 2 * TILE_BLOCK_BYTES
SYMMETRIC_PAIR_BYTES = PAIR_CODE_BYTES + 2 * ROWS_PER_TILE * 2  # codes + float16 scales of two blocks
ASYMMETRIC_PAIR_BYTES = SYMMETRIC_PAIR_BYTES + 2 * ROWS_PER_TILE * 2  # ... + float16 mins
# Measured on demo and 7B shapes, 2 threads: from ~96-128 rows on, dequantize + GEMM is as fast as the kernel with two
# activation levels or faster; with one level the kernel stays ahead at any size (bench/RESULTS.md).
KERNEL_MAX_ROWS = 96
_levels = 2  # int8 activation levels of the kernel in the current forward (set_activation_levels)


def set_activation_levels(levels: int) -> None:
    """Sets how many int8 levels the VNNI kernels (int4 and int8 layers) quantize activations to, until set again: 2
    (the default; error below bfloat16's) or 1 (ggml's Q8_0 precision: half the kernel's arithmetic, which is what
    bounds it at batches of ~8 rows and more; near-tied greedy tokens can flip). The engine's runner sets it per
    step (``EngineArgs.one_level_from``) and restores 2 after the forward."""
    global _levels
    if levels not in (1, 2):
        raise ValueError(f"activation levels must be 1 or 2, got {levels}")
    _levels = levels


def activation_levels() -> int:
    """The int8 activation levels the VNNI kernels use now (see :func:`set_activation_levels`)."""
    return _levels


def _linear(x: torch.Tensor, qdata: torch.Tensor, asym: bool) -> torch.Tensor:
    return torch.ops.airun_int4.linear.default(x, qdata, asym, _levels)


def _shape_ok(out_features: int, in_features: int, group_size: int) -> bool:
    """Whole tiles of 16 rows, inputs in whole pairs of 32-blocks, groups that are whole blocks."""
    return (out_features % ROWS_PER_TILE == 0 and in_features % (2 * BLOCK) == 0 and group_size % BLOCK == 0
            and in_features % group_size == 0)


def vnni_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel takes this shape (:func:`_shape_ok`) and is built."""
    return _shape_ok(out_features, in_features, group_size) and native.available()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in ``[0, 15]`` -> ``[N / 16, K / 32, 256]`` uint8: each block's codes as the kernel reads them
    (see the C++ file)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // ROWS_PER_TILE, ROWS_PER_TILE, k // BLOCK, 2, 4, 4)  # t, r, b, half, j, i
    c = c.permute(0, 2, 4, 1, 5, 3)  # t, b, j, r, i, half
    return (c[..., 0] | (c[..., 1] << 4)).reshape(n // ROWS_PER_TILE, k // BLOCK, TILE_BLOCK_BYTES).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: ``[N / 16, K / 32, 256]`` uint8 -> ``[N, K]`` codes."""
    tiles, blocks, _ = packed.shape
    b = packed.view(tiles, blocks, 4, ROWS_PER_TILE, 4)  # t, b, j, r, i
    c = torch.stack([b & 15, b >> 4], dim=-1)  # t, b, j, r, i, half
    return c.permute(0, 3, 1, 5, 2, 4).reshape(tiles * ROWS_PER_TILE, blocks * BLOCK)


def _per_block(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K / group_size]`` -> ``[N / 16, K / 32, 16]`` float16 (each group's value repeated over its blocks)."""
    n = v.shape[0]
    v = v.repeat_interleave(group_size // BLOCK, dim=1)
    return v.view(n // ROWS_PER_TILE, ROWS_PER_TILE, -1).transpose(1, 2).to(torch.float16).contiguous()


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """``[T, nb, ...]`` -> ``[T, nb / 2, bytes of two blocks]`` uint8."""
    t, nb = x.shape[:2]
    return x.contiguous().view(torch.uint8).reshape(t, nb // 2, -1)


def pack_weight(w: Int4Weight) -> tuple[torch.Tensor, bool]:
    """``(qdata, asym)``: the kernel's single tensor ``[N / 16, K / 64, 576 or 640]`` for ``w`` (layout in the C++
    file),
    and whether it carries mins (False when ``mins == -8 * scales`` exactly, as GGUF Q4_0: then none are stored)."""
    asym = not torch.equal(w.mins, -8.0 * w.scales)
    parts = [_pairs(pack_codes(w.codes)), _pairs(_per_block(w.scales, w.group_size))]
    if asym:
        parts.append(_pairs(_per_block(w.mins, w.group_size)))
    return torch.cat(parts, dim=-1).contiguous(), asym


class Int4VnniLinear(nn.Module):
    """``y = x @ W.T`` for a group-wise int4 weight, a drop-in for ``nn.Linear(in, out, bias=False)``.

    Invariants: ``qdata`` uint8 ``[N / 16, K / 64, 576]`` for symmetric weights (``mins == -8 * scales``, GGUF Q4_0;
    18 bytes per 32 weights, as the GGUF block) or ``[N / 16, K / 64, 640]`` with mins (20 bytes, as Q4_1): per tile of
    16 rows and pair of 32-input blocks, the codes, float16 scales and mins in one stream (``int4_vnni.cpp``). The
    output has the dtype of ``x``."""

    def __init__(self, in_features: int, out_features: int, group_size: int, device: torch.device | str | None = None):
        super().__init__()
        if not _shape_ok(out_features, in_features, group_size):
            shape = f"{out_features}x{in_features}"
            raise ValueError(f"the int4 VNNI kernel takes no {shape} weight in groups of {group_size}")
        if not native.available():
            raise RuntimeError("airun's native kernels are not available on this machine (see the log)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        shape = (out_features // ROWS_PER_TILE, in_features // (2 * BLOCK), ASYMMETRIC_PAIR_BYTES)
        self.register_buffer("qdata", torch.empty(shape, dtype=torch.uint8, device=device))

    def extra_repr(self) -> str:
        kind = "with mins" if self.asym else "symmetric"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, {kind}"

    @property
    def asym(self) -> bool:
        return self.qdata.shape[-1] == ASYMMETRIC_PAIR_BYTES

    @property
    def symmetric(self) -> bool:
        return not self.asym

    def codes(self) -> torch.Tensor:
        """The ``[N, K]`` codes (for tests and inspection)."""
        t, p, _ = self.qdata.shape
        return unpack_codes(self.qdata[..., :PAIR_CODE_BYTES].reshape(t, 2 * p, TILE_BLOCK_BYTES))

    @torch.no_grad()
    def load(self, w: Int4Weight) -> None:
        """Packs the complete weight ``w``. Scales and mins are stored in float16 (exact for GGUF's Q4_0 and Q4_1,
        whose d and m are float16). Raises ValueError when a scale or min does not fit float16."""
        if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
            raise ValueError(f"int4 weight {w.shape} (group {w.group_size}) does not fit {self}")
        fp16_max = torch.finfo(torch.float16).max
        if max(float(w.scales.abs().max()), float(w.mins.abs().max())) > fp16_max:
            raise ValueError("int4 scales or mins beyond the float16 range")
        self.qdata = pack_weight(w)[0].to(self.qdata.device)

    def _weight_args(self) -> tuple[torch.Tensor, bool]:
        """(qdata, asym), cached: a decode step calls this layer's kernel hundreds of times, and nn.Module's attribute
        lookup of buffers is a measurable part of that. Rebuilt when the buffer was replaced."""
        args = self.__dict__.get("_args")
        if args is None or args[0] is not self._buffers["qdata"]:
            args = (self.qdata, self.asym)
            self.__dict__["_args"] = args
        return args

    def kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` through the VNNI kernel (float32 or bfloat16 in and out)."""
        if x2.dtype not in (torch.float32, torch.bfloat16):
            return _linear(x2.float(), *self._weight_args()).to(x2.dtype)
        return _linear(x2, *self._weight_args())

    def dequantize(self, dtype: torch.dtype = torch.float32, tile0: int = 0, tile1: int | None = None) -> torch.Tensor:
        """Rows ``[16 * tile0, 16 * tile1)`` of the weight the layer computes with, ``[rows, K]`` in ``dtype``."""
        tile1 = self.qdata.shape[0] if tile1 is None else tile1
        native_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        return torch.ops.airun_int4.dequant(self.qdata, self.asym, tile0, tile1, native_dtype).to(dtype)

    def dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` by dense GEMMs over tiles of the weight dequantized to the dtype of ``x2``."""
        y = x2.new_empty(x2.shape[0], self.out_features)
        tiles = self.qdata.shape[0]
        step = max(1, DEQUANT_TILE_ELEMENTS // (self.in_features * ROWS_PER_TILE))
        for t0 in range(0, tiles, step):
            t1 = min(t0 + step, tiles)
            y[:, t0 * ROWS_PER_TILE : t1 * ROWS_PER_TILE] = F.linear(x2, self.dequantize(x2.dtype, t0, t1))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= KERNEL_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
            return _linear(x, *self._weight_args())  # the decode path, kept short
        x2 = x.reshape(-1, self.in_features)
        # one level: the kernel beats dequantize + GEMM at every size (~15% at 1,024 rows); two: up to ~96 rows
        kernel = x2.shape[0] <= KERNEL_MAX_ROWS or _levels == 1
        y = self.kernel_matmul(x2) if kernel else self.dequant_matmul(x2)
        return y.view(*x.shape[:-1], self.out_features)


__all__ = [
    "KERNEL_MAX_ROWS",
    "Int4VnniLinear",
    "activation_levels",
    "pack_codes",
    "pack_weight",
    "set_activation_levels",
    "unpack_codes",
    "vnni_supported",
]
