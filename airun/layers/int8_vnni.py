"""Per-channel int8 linears on airun's own AVX-512 VNNI kernel (``airun/csrc/int8_vnni.cpp``), for x86 CPUs that have
it: chiefly the output head, the widest matrix of a small model and a tenth of a 7B model's bytes.

PyTorch's ``_weight_int8pack_mm`` reads int8 weights at bandwidth for one row but is compute-bound and slower than a
bf16 GEMM from ~8 rows on; this kernel quantizes the activations to int8 per block of 32 (one or two levels, as the
int4 kernel: :func:`airun.layers.int4_vnni.set_activation_levels`) and runs VNNI dot products, 16 output rows per
instruction, up to :data:`KERNEL_MAX_ROWS` rows; above, it dequantizes tile by tile and runs a dense GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from airun import native
from airun.layers import int4_vnni
from airun.layers.quant import DEQUANT_TILE_ELEMENTS, Int8Weight

ROWS_PER_TILE = 16
BLOCK = 32
KERNEL_MAX_ROWS = 96


def vnni8_supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes this shape (whole tiles of 16 rows, whole blocks of 32 inputs) and is built."""
    return out_features % ROWS_PER_TILE == 0 and in_features % BLOCK == 0 and native.available()


class Int8VnniLinear(nn.Module):
    """``y = x @ (scales[:, None] * q).T`` without a bias; a drop-in for ``nn.Linear(in, out, bias=False)``.

    Invariants: ``qdata`` uint8 ``[N / 16, K / 32, 512]`` holds ``q + 128`` in the kernel's order (``int8_vnni.cpp``:
    tile, block, 4-input group, row, input); ``scales`` float32 ``[N]``. The output has the dtype of ``x``, or float32
    when ``float_output`` (set for the head: logits are used in float32, and the kernel accumulates in it)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if out_features % ROWS_PER_TILE or in_features % BLOCK:
            raise ValueError(f"the int8 VNNI kernel takes no {out_features}x{in_features} weight")
        if not native.available():
            raise RuntimeError("airun's native kernels are not available on this machine (see the log)")
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features // ROWS_PER_TILE, in_features // BLOCK, ROWS_PER_TILE * BLOCK)
        self.register_buffer("qdata", torch.empty(shape, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.float_output = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel (VNNI)"

    def _rows_view(self) -> torch.Tensor:
        """``qdata`` as a ``[tiles, 16 rows, blocks, 8, 4]`` view (row ``16 t + r``, input ``32 b + 4 j + i``)."""
        t, nb, _ = self.qdata.shape
        return self.qdata.view(t, nb, 8, ROWS_PER_TILE, 4).permute(0, 3, 1, 2, 4)

    @property
    def qweight(self) -> torch.Tensor:
        """The ``[N, K]`` int8 weight codes (for tests and inspection)."""
        v = self._rows_view()
        return (v.reshape(self.out_features, self.in_features).to(torch.int16) - 128).to(torch.int8)

    @torch.no_grad()
    def load_rows(self, row: int, w: Int8Weight) -> None:
        """Writes ``w`` into output rows ``[row, row + N)`` (any offset: rows are independent)."""
        n = w.qweight.shape[0]
        if tuple(w.qweight.shape) != (n, self.in_features) or row < 0 or row + n > self.out_features:
            raise ValueError(f"int8 rows {row}..{row + n} of shape {tuple(w.qweight.shape)} do not fit {self}")
        rows = torch.arange(row, row + n)
        codes = (w.qweight.to(torch.int16) + 128).to(torch.uint8).view(n, self.in_features // BLOCK, 8, 4)
        self._rows_view()[rows // ROWS_PER_TILE, rows % ROWS_PER_TILE] = codes.to(self.qdata.device)
        self.scales[row : row + n] = w.scales.to(self.scales.device, torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32, row0: int = 0, row1: int | None = None) -> torch.Tensor:
        """Rows ``[row0, row1)`` (whole tiles) of the weight the layer computes with, ``[rows, K]`` in ``dtype``."""
        row1 = self.out_features if row1 is None else row1
        v = self._rows_view()[row0 // ROWS_PER_TILE : row1 // ROWS_PER_TILE]
        q = v.reshape(row1 - row0, self.in_features).to(dtype) - 128
        return q * self.scales[row0:row1, None].to(dtype)

    def kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` through the VNNI kernel (float32 or bfloat16 in; out, see ``float_output``)."""
        xk = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
        levels = int4_vnni.activation_levels()
        y = torch.ops.airun_int8.linear.default(xk, self.qdata, self.scales, levels, self.float_output)
        return y if self.float_output else y.to(x2.dtype)

    def dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` by dense GEMMs over tiles of the weight dequantized to the dtype of ``x2``."""
        y = x2.new_empty(x2.shape[0], self.out_features)
        step = max(ROWS_PER_TILE, DEQUANT_TILE_ELEMENTS // self.in_features // ROWS_PER_TILE * ROWS_PER_TILE)
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            y[:, r0:r1] = F.linear(x2, self.dequantize(x2.dtype, r0, r1))
        return y.float() if self.float_output else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = x2.shape[0] <= KERNEL_MAX_ROWS or int4_vnni.activation_levels() == 1  # as the int4 layer
        y = self.kernel_matmul(x2) if kernel else self.dequant_matmul(x2)
        return y.view(*x.shape[:-1], self.out_features)


__all__ = ["KERNEL_MAX_ROWS", "Int8VnniLinear", "vnni8_supported"]
