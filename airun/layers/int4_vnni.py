"""Group-wise int4 linears on airun's own AVX-512 VNNI kernel (``airun/csrc/int4_vnni.cpp``), for x86 CPUs that have it.

PyTorch's ``_weight_int4pack_mm_for_cpu`` reads int4 weights at about half the memory bandwidth, so a 4-bit 7B model
decodes at about half of llama.cpp's speed with it. This kernel does what ggml's Q4_0 x Q8_0 path does: activations
are quantized to int8 per block of 32, and each weight block is a VNNI dot product of unsigned codes with them,
sixteen output rows per instruction. Where :func:`airun.native.available` is False (no C++ build, no AVX-512 VNNI, or
``AIRUN_NATIVE_KERNELS=0``), int4 layers use :class:`~airun.layers.quant.Int4Linear` instead.

Rows above :data:`KERNEL_MAX_ROWS` (prefill) dequantize the weight tile by tile into the activation dtype and run a
dense GEMM, never holding a full-precision copy of the weight.
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
KERNEL_MAX_ROWS = 32  # measured (demo and 7B shapes, 2 threads): from ~32 rows on, dequantize + GEMM is as fast or faster
def _LINEAR(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.airun_int4.linear.default(x, packed, scales, mins)


def vnni_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel takes this shape: whole tiles of 16 rows, groups that are whole blocks of 32, and a build."""
    shape_ok = out_features % ROWS_PER_TILE == 0 and in_features % BLOCK == 0 and group_size % BLOCK == 0
    return shape_ok and in_features % group_size == 0 and native.available()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in ``[0, 15]`` -> ``[N / 16, K / 32, 256]`` uint8 in the kernel's layout (see the C++ file)."""
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


class Int4VnniLinear(nn.Module):
    """``y = x @ W.T`` for a group-wise int4 weight, a drop-in for ``nn.Linear(in, out, bias=False)``.

    Invariants: ``packed`` uint8 ``[N / 16, K / 32, 256]`` (layout in ``int4_vnni.cpp``); ``scales`` float16
    ``[N / 16, K / 32, 16]``; ``mins`` the same, or an empty tensor for symmetric weights (``mins == -8 * scales``,
    GGUF Q4_0), which the kernel then never reads. The output has the dtype of ``x``."""

    def __init__(self, in_features: int, out_features: int, group_size: int, device: torch.device | str | None = None):
        super().__init__()
        if out_features % ROWS_PER_TILE or in_features % BLOCK or group_size % BLOCK or in_features % group_size:
            raise ValueError(f"the int4 VNNI kernel takes no {out_features}x{in_features} weight in groups of {group_size}")
        if not native.available():
            raise RuntimeError("airun's native kernels are not available on this machine (see the log)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        tiles, blocks = out_features // ROWS_PER_TILE, in_features // BLOCK
        self.register_buffer("packed", torch.empty(tiles, blocks, TILE_BLOCK_BYTES, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(tiles, blocks, ROWS_PER_TILE, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(tiles, blocks, ROWS_PER_TILE, dtype=torch.float16, device=device))

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "with mins"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, {kind}"

    @property
    def symmetric(self) -> bool:
        return self.mins.numel() == 0

    @torch.no_grad()
    def load(self, w: Int4Weight) -> None:
        """Packs the complete weight ``w``. Scales and mins are stored in float16 (exact for GGUF's Q4_0 and Q4_1,
        whose d and m are float16); a weight whose mins are exactly ``-8 * scales`` is stored without mins. Raises
        ValueError when a scale or min does not fit float16."""
        if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
            raise ValueError(f"int4 weight {w.shape} (group {w.group_size}) does not fit {self}")
        fp16_max = torch.finfo(torch.float16).max
        if max(float(w.scales.abs().max()), float(w.mins.abs().max())) > fp16_max:
            raise ValueError("int4 scales or mins beyond the float16 range")
        dev = self.packed.device
        self.packed = pack_codes(w.codes).to(dev)
        self.scales = _per_block(w.scales, self.group_size).to(dev)
        sym = torch.equal(w.mins, -8.0 * w.scales)
        self.mins = torch.empty(0, dtype=torch.float16, device=dev) if sym else _per_block(w.mins, self.group_size).to(dev)

    def _mins_arg(self) -> torch.Tensor | None:
        return None if self.symmetric else self.mins

    def _weight_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(packed, scales, mins or None), cached: a decode step calls this layer's kernel hundreds of times, and
        nn.Module's attribute lookup of buffers is a measurable part of that. Rebuilt when a buffer was replaced."""
        args = self.__dict__.get("_args")
        if args is None or args[0] is not self._buffers["packed"] or args[1] is not self._buffers["scales"] or (
            args[2] is not None and args[2] is not self._buffers["mins"]
        ):
            args = (self.packed, self.scales, self._mins_arg())
            self.__dict__["_args"] = args
        return args

    def kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` through the VNNI kernel (float32 or bfloat16 in and out)."""
        if x2.dtype not in (torch.float32, torch.bfloat16):
            return _LINEAR(x2.float(), *self._weight_args()).to(x2.dtype)
        return _LINEAR(x2, *self._weight_args())

    def dequantize(self, dtype: torch.dtype = torch.float32, tile0: int = 0, tile1: int | None = None) -> torch.Tensor:
        """Rows ``[16 * tile0, 16 * tile1)`` of the weight the layer computes with, ``[rows, K]`` in ``dtype``."""
        tile1 = self.packed.shape[0] if tile1 is None else tile1
        native = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        w = torch.ops.airun_int4.dequant(self.packed, self.scales, self._mins_arg(), tile0, tile1, native)
        return w.to(dtype)

    def dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` by dense GEMMs over tiles of the weight dequantized to the dtype of ``x2``."""
        y = x2.new_empty(x2.shape[0], self.out_features)
        tiles = self.packed.shape[0]
        step = max(1, DEQUANT_TILE_ELEMENTS // (self.in_features * ROWS_PER_TILE))
        for t0 in range(0, tiles, step):
            t1 = min(t0 + step, tiles)
            y[:, t0 * ROWS_PER_TILE : t1 * ROWS_PER_TILE] = F.linear(x2, self.dequantize(x2.dtype, t0, t1))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= KERNEL_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
            return _LINEAR(x, *self._weight_args())  # the decode path, kept short
        x2 = x.reshape(-1, self.in_features)
        y = self.kernel_matmul(x2) if x2.shape[0] <= KERNEL_MAX_ROWS else self.dequant_matmul(x2)
        return y.view(*x.shape[:-1], self.out_features)


__all__ = ["KERNEL_MAX_ROWS", "Int4VnniLinear", "pack_codes", "unpack_codes", "vnni_supported"]
