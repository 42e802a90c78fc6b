"""Weight-only quantized linear layers (int8 per output channel, int4 group-wise) that stand in for ``nn.Linear``.

Formats (the values a checkpoint is converted to before a layer is built from it):

- :class:`Int8Weight`: ``w[n, k] = scales[n] * q[n, k]``, ``q`` int8 in ``[-127, 127]``.
- :class:`Int4Weight`: ``w[n, k] = scales[n, g] * codes[n, k] + mins[n, g]`` with ``g = k // group_size`` and ``codes``
  in ``[0, 15]``. This is GGUF Q4_1's form (Q4_0 is ``mins = -8 * scales``; Q4_K is ``scales = d * sc``,
  ``mins = -dmin * m`` per 32 values), so those formats convert to it without loss.

Kernels. :class:`Int8Linear` runs ``aten._weight_int8pack_mm``; :class:`Int4Linear` runs PyTorch's tinygemm int4 kernels
(``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA), which compute
``w = (codes - 8) * scale + zero`` with ``scales_and_zeros[g, n] = (scale, zero)`` in bfloat16, so a layer stores
``zero = mins + 8 * scales``. Both kernels re-read the quantized weight for every few rows of activations, so their
cost grows linearly with the number of rows ``M``; above a row threshold the layer instead dequantizes its weight one
tile at a time and calls the dense ``matmul`` (never keeping a full-precision copy). Thresholds, measured on a 2-core
AVX-512 (bf16) CPU with the demo model's shapes (576x576, 960x576, 3072x576, 576x1536, 49152x576) and M = 1..256
(``bench/quant_kernels.py``, minimum of repeated runs):

- int8: the kernel is 2-3x faster than bf16 ``F.linear`` at M = 1, equal near M = 8, 2x slower at M = 16 and 3x at
  M = 256 (its cost is linear in M); dequantize-per-tile (one int8->bf16 pass over the weight, ~0.1 ns per weight) +
  matmul is 1.1-1.4x bf16 from M = 32 on, and beats the kernel from M ~ 16-24 on. Kernel for ``M <= 16``.
- int4: the kernel is 2.5-4x faster than bf16 at M = 1, equal near M = 8, 2.8x slower at M = 256; unpacking int4 costs
  ~0.4 ns per weight, so dequantize + matmul beats the kernel from M ~ 64-100 on (1.3-1.9x faster than it at
  M = 192-256). Kernel for ``M <= 64``.

The kernels run in bfloat16: it is the only activation dtype PyTorch vectorizes them for on CPU (float32 and float16
take a scalar path, 25-100x slower at M = 1), and the only one of the CUDA int4 kernel. So scales are stored in
bfloat16, small batches are computed in bfloat16 whatever the model dtype, and the large-M path dequantizes to the
input dtype.

The CPU int4 packed layout depends on the SIMD level PyTorch dispatches to; the layer dequantizes it only when it
recognises the layout (verified once per process by packing a probe and unpacking it); otherwise every M uses the
kernel. On CUDA the int4 path always uses the kernel and is written from PyTorch's kernel source, not run here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

QuantFormat = Literal["int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
COMPUTE_DTYPE = torch.bfloat16  # activation dtype of the kernels, and dtype of the stored scales
INT8_KERNEL_MAX_ROWS = 16
INT4_KERNEL_MAX_ROWS = 64
DEQUANT_TILE_ELEMENTS = 1 << 21  # weights dequantized per tile on the large-M path (4 MiB in bf16)
PACK_CHUNK_ROWS = 1024  # rows packed per call when loading int4 (a multiple of every kernel's row block)


@dataclass(slots=True, frozen=True)
class Int8Weight:
    """Invariants: ``qweight`` int8 ``[N, K]`` in ``[-127, 127]``; ``scales`` float32 ``[N]``, finite, >= 0."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]``."""
        return self.qweight.float() * self.scales[:, None]


@dataclass(slots=True, frozen=True)
class Int4Weight:
    """Invariants: ``codes`` uint8 ``[N, K]`` in ``[0, 15]``; ``scales`` and ``mins`` float32 ``[N, K / group_size]``;
    ``K % group_size == 0``."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]``, computed as ``scales * codes + mins`` (one rounding, as ggml does)."""
        n, k = self.shape
        q = self.codes.view(n, k // self.group_size, self.group_size).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(n, k)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int4Weight:
        """The same weight with ``fn`` applied to the rows of codes, scales and mins (e.g. a row permutation)."""
        return Int4Weight(fn(self.codes), fn(self.scales), fn(self.mins), self.group_size)


def quantize_int8(w: torch.Tensor, chunk_rows: int = 4096) -> Int8Weight:
    """Symmetric per-row int8: ``scale = max|w_row| / 127``, ``q = round(w / scale)`` (ties to even). An all-zero row
    gets scale 0. Works through ``chunk_rows`` rows at a time, so the float32 temporaries stay small."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, dtype=torch.float32, device=w.device)
    for r in range(0, n, chunk_rows):
        x = w[r : r + chunk_rows].to(torch.float32, copy=True)  # a copy: ``w`` itself is never written
        s = x.abs().amax(dim=1) / 127.0
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[r : r + chunk_rows].copy_(x.mul_(inv[:, None]).round_().clamp_(-127, 127))
        scales[r : r + chunk_rows] = s
    return Int8Weight(q, scales)


def quantize_int4(w: torch.Tensor, group_size: int, chunk_rows: int = 2048) -> Int4Weight:
    """Asymmetric group-wise int4 by round-to-nearest: per group of ``group_size`` consecutive inputs,
    ``scale = (max - min) / 15``, ``min = min``, ``code = round((w - min) / scale)`` clamped to ``[0, 15]`` (a constant
    group gets scale 0). Raises ValueError when ``K`` is not a multiple of ``group_size``."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    g = k // group_size
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, g, dtype=torch.float32, device=w.device)
    mins = torch.empty(n, g, dtype=torch.float32, device=w.device)
    for r in range(0, n, chunk_rows):
        x = w[r : r + chunk_rows].float().view(-1, g, group_size)
        lo, hi = torch.aminmax(x, dim=2)
        s = (hi - lo) / 15.0
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q = torch.addcmul((-lo * inv)[..., None], x, inv[..., None])  # (x - lo) / scale
        codes[r : r + chunk_rows].copy_(q.round_().clamp_(0, 15).view(-1, k))
        scales[r : r + chunk_rows] = s
        mins[r : r + chunk_rows] = lo
    return Int4Weight(codes, scales, mins, group_size)


def int4_group_size(in_features: int, preferred: int) -> int | None:
    """The largest kernel group size ``<= preferred`` that divides ``in_features`` (None if there is none)."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= preferred and in_features % g == 0:
            return g
    return None


def int4_supported(out_features: int, in_features: int, group_size: int, device_type: str) -> bool:
    """Whether the int4 kernel of ``device_type`` accepts this shape (CPU: N % 16 == 0; CUDA: N % 8 == 0 and
    K % 32 == 0; both: K % group_size == 0 and a kernel group size)."""
    if group_size not in INT4_GROUP_SIZES or in_features % group_size:
        return False
    if device_type == "cuda":
        return out_features % 8 == 0 and in_features % 32 == 0
    return out_features % 16 == 0 and in_features % 2 == 0


def _rows_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).contiguous()


class Int8Linear(nn.Module):
    """``y = x @ (scales[:, None] * qweight).T`` without a bias; a drop-in for ``nn.Linear(in, out, bias=False)``.

    Invariants: ``qweight`` int8 ``[out_features, in_features]``; ``scales`` bfloat16 ``[out_features]``. The output has
    the dtype of ``x``."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"

    @torch.no_grad()
    def load_rows(self, row: int, w: Int8Weight) -> None:
        """Writes ``w`` into output rows ``[row, row + N)`` (per-channel int8 rows are independent)."""
        n = w.qweight.shape[0]
        if tuple(w.qweight.shape) != (n, self.in_features) or row < 0 or row + n > self.out_features:
            raise ValueError(f"int8 rows {row}..{row + n} of shape {tuple(w.qweight.shape)} do not fit {self}")
        self.qweight[row : row + n].copy_(w.qweight)
        self.scales[row : row + n].copy_(w.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[N, K]`` the layer computes with, in ``dtype``."""
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` through the int8 kernel, in bfloat16."""
        return torch.ops.aten._weight_int8pack_mm(x2.to(COMPUTE_DTYPE), self.qweight, self.scales.to(COMPUTE_DTYPE))

    def dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` by dense matmuls over tiles of int8 rows converted to the dtype of ``x2``; the
        per-channel scales multiply the output columns (they commute with the matmul)."""
        y = x2.new_empty(x2.shape[0], self.out_features)
        scales = self.scales.to(x2.dtype)
        tile = max(1, DEQUANT_TILE_ELEMENTS // self.in_features)
        for r in range(0, self.out_features, tile):
            e = min(r + tile, self.out_features)
            torch.mul(F.linear(x2, self.qweight[r:e].to(x2.dtype)), scales[r:e], out=y[:, r:e])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows_2d(x, self.in_features)
        y = self.kernel_matmul(x2) if x2.shape[0] <= INT8_KERNEL_MAX_ROWS else self.dequant_matmul(x2)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


@dataclass(slots=True, frozen=True)
class Int4CpuLayout:
    """How ``_convert_weight_to_int4pack_for_cpu`` lays out ``[N, K]`` codes in its ``[N, K / 2]`` uint8 output: rows go
    in blocks of ``block`` (the last one may be shorter); a block's bytes are ``[K, rows / 2]`` (k-major); in a full
    block, byte ``j`` holds row ``j`` in its low nibble and row ``j + block / 2`` in its high nibble when ``halves``,
    else rows ``2j`` and ``2j + 1``; a shorter last block always holds rows ``2j`` and ``2j + 1``."""

    block: int
    halves: bool


def _unpack_block_bytes(b: torch.Tensor, halves: bool) -> torch.Tensor:
    """``[..., K, R/2]`` packed bytes -> ``[..., K, R]`` codes (uint8)."""
    lo, hi = b & 15, b >> 4
    if halves:
        return torch.cat([lo, hi], dim=-1)
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _unpack_cpu(packed: torch.Tensor, n: int, k: int, layout: Int4CpuLayout) -> torch.Tensor:
    """The ``[N, K]`` codes of a CPU-packed weight (for tests and probes; the matmul path unpacks per tile)."""
    flat = packed.reshape(-1)
    full = n // layout.block
    head = flat[: full * k * layout.block // 2].view(full, k, layout.block // 2)
    rows = [_unpack_block_bytes(head, layout.halves).permute(0, 2, 1).reshape(full * layout.block, k)]
    if n % layout.block:
        tail = flat[full * k * layout.block // 2 :].view(k, (n % layout.block) // 2)
        rows.append(_unpack_block_bytes(tail, False).t())
    return torch.cat(rows, 0)


@functools.cache
def cpu_int4_layout() -> Int4CpuLayout | None:
    """The CPU int4 packed layout of this process's PyTorch build and SIMD level, or None if it is none of the known
    ones. Found by packing probes (full blocks plus a shorter last block) and checking that unpacking returns them."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((176, 64), (64, 32)):
        probe = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        for cand in (Int4CpuLayout(b, h) for h in (True, False) for b in (64, 32)):
            if torch.equal(_unpack_cpu(packed, n, k, cand).int(), probe):
                break
        else:
            return None
        if n == 176:
            found = cand
        elif cand != found:
            return None
    return found


def _pack_int4_cuda(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes -> the CUDA tinygemm layout. The CUDA converter takes ``[N, K / 2]`` uint8 with element ``2j``
    in the high nibble of byte ``j`` and ``2j + 1`` in the low nibble (see ``matrix_to_m16n8k16_Bint4_layout``)."""
    k = codes.shape[1]
    inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    b = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(b, inner_k_tiles)


class Int4Linear(nn.Module):
    """``y = x @ W.T`` for a group-wise int4 weight ``W[n, k] = (codes[n, k] - 8) * scale[g, n] + zero[g, n]``,
    ``g = k // group_size``; a drop-in for ``nn.Linear(in, out, bias=False)``.

    Invariants: ``packed`` is the kernel layout of the codes for ``backend`` ("cpu": uint8 ``[N, K / 2]``; "cuda": int32
    ``[N / 8, K / (tiles * 16), 32, tiles / 2]``); ``scales_and_zeros`` is bfloat16 ``[K / group_size, N, 2]``. The
    output has the dtype of ``x``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        device: torch.device | str | None = None,
        backend: str = "cpu",
    ) -> None:
        super().__init__()
        if not int4_supported(out_features, in_features, group_size, backend):
            shape = f"{out_features}x{in_features}"
            raise ValueError(f"int4 {backend} kernels take no {shape} weight in groups of {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.backend = group_size, backend
        if backend == "cuda":
            tiles = 8 if in_features % 128 == 0 else 4 if in_features % 64 == 0 else 2
            shape, pdtype = (out_features // 8, in_features // (tiles * 16), 32, tiles // 2), torch.int32
        else:
            shape, pdtype = (out_features, in_features // 2), torch.uint8
        self.register_buffer("packed", torch.empty(shape, dtype=pdtype, device=device))
        self.register_buffer(
            "scales_and_zeros",
            torch.empty(in_features // group_size, out_features, 2, dtype=COMPUTE_DTYPE, device=device),
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"

    @torch.no_grad()
    def load(self, w: Int4Weight) -> None:
        """Packs the complete weight ``w`` (all ``out_features`` rows) into the kernel layout, ``PACK_CHUNK_ROWS`` rows
        at a time (packing is row-block local, so the int32 temporary the packer needs stays small)."""
        if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
            raise ValueError(f"int4 weight {w.shape} (group {w.group_size}) does not fit {self}")
        dev = self.packed.device
        for r in range(0, self.out_features, PACK_CHUNK_ROWS):
            e = min(r + PACK_CHUNK_ROWS, self.out_features)
            codes = w.codes[r:e].to(dev)
            if self.backend == "cuda":
                self.packed[r // 8 : e // 8].copy_(_pack_int4_cuda(codes))
            else:
                self.packed[r:e].copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
            s, m = w.scales[r:e].to(dev), w.mins[r:e].to(dev)
            self.scales_and_zeros[:, r:e, 0].copy_(s.t())
            self.scales_and_zeros[:, r:e, 1].copy_((m + 8.0 * s).t())

    def kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` through the int4 kernel, in bfloat16."""
        x2, sz = x2.to(COMPUTE_DTYPE), self.scales_and_zeros.to(COMPUTE_DTYPE)  # no-ops unless a .to(dtype) cast them
        if self.backend == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, sz)

    @property
    def can_dequantize(self) -> bool:
        """Whether the weight can be unpacked tile by tile (a CPU layout :func:`cpu_int4_layout` recognises)."""
        return self.backend == "cpu" and cpu_int4_layout() is not None

    def dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` by dense matmuls over tiles of the weight dequantized to the dtype of ``x2``."""
        y = x2.new_empty(x2.shape[0], self.out_features)
        for r0, r1, wt in self._dequant_tiles(x2.dtype):
            y[:, r0:r1] = x2 @ wt
        return y

    def _dequant_tiles(self, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, W[r0:r1].T)``: the dequantized weight of output rows ``[r0, r1)`` as ``[K, r1 - r0]`` in
        ``dtype``, tile by tile (CPU layout only; requires :func:`cpu_int4_layout`)."""
        layout = cpu_int4_layout()
        assert layout is not None and self.backend == "cpu"
        n, k, g, bn = self.out_features, self.in_features, self.group_size, layout.block
        flat = self.packed.view(-1)
        full = n // bn
        blocks_per_tile = max(1, DEQUANT_TILE_ELEMENTS // (k * bn))
        spans = [(b * bn, min(b + blocks_per_tile, full) * bn) for b in range(0, full, blocks_per_tile)]
        if n % bn:
            spans.append((full * bn, n))
        for r0, r1 in spans:
            rows = r1 - r0
            raw = flat[r0 * k // 2 : r1 * k // 2]
            w = torch.empty(k, rows, dtype=torch.float32, device=self.packed.device)
            if r1 <= full * bn:  # whole blocks: [t, K, bn/2] bytes -> [K, t, bn] codes
                codes = _unpack_block_bytes(raw.view(rows // bn, k, bn // 2), layout.halves)
                w.view(k, rows // bn, bn).copy_(codes.permute(1, 0, 2))
            else:  # the shorter last block: [K, rows/2] bytes, rows in pairs
                w.copy_(_unpack_block_bytes(raw.view(k, rows // 2), False))
            sz = self.scales_and_zeros[:, r0:r1].float()
            scale = sz[..., 0].contiguous()  # contiguous: broadcasting a strided operand is ~6x slower
            zero = sz[..., 1] - 8.0 * scale
            out = torch.empty(k, rows, dtype=dtype, device=w.device)
            torch.addcmul(zero.unsqueeze(1), w.view(k // g, g, rows), scale.unsqueeze(1), out=out.view(k // g, g, rows))
            yield r0, r1, out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[N, K]`` the layer computes with, in ``dtype`` (unpacked tile by tile where the layout is
        known, else read back through the kernel with an identity matrix)."""
        if self.can_dequantize:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.packed.device)
            for r0, r1, wt in self._dequant_tiles(dtype):
                out[r0:r1] = wt.t()
            return out
        eye = torch.eye(self.in_features, dtype=COMPUTE_DTYPE, device=self.packed.device)
        return self.kernel_matmul(eye).t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows_2d(x, self.in_features)
        if x2.shape[0] <= INT4_KERNEL_MAX_ROWS or not self.can_dequantize:
            y = self.kernel_matmul(x2)
        else:
            y = self.dequant_matmul(x2)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantized_linear(
    fmt: QuantFormat,
    in_features: int,
    out_features: int,
    device: torch.device | str | None,
    group_size: int,
    backend: str,
) -> Int8Linear | Int4Linear:
    """An empty quantized linear of format ``fmt`` (fill it with ``load_rows`` / ``load``)."""
    if fmt == "int8":
        return Int8Linear(in_features, out_features, device)
    return Int4Linear(in_features, out_features, group_size, device, backend)
