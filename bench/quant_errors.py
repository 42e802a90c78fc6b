"""Error of each GGUF -> airun layer conversion, against the GGUF format's own rounding error.

For every type, a tensor is made (quantized by ``gguf`` from Gaussian floats where it can, else random codes with
realistic scales), dequantized with ``gguf.quants.dequantize`` (the reference), converted the way airun keeps it, and
the rms of (converted - reference) is compared with the rms rounding error of the format itself (step / sqrt(12),
step read from the block scales). Also shown: what the other layout would cost.

    python bench/quant_errors.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from airun.layers.quant import Int4Linear, quantize_int4, quantize_int8  # noqa: E402
from airun.loader.gguf_quant import native_format, repack_int4  # noqa: E402
from tests.test_quant_gguf import blocks, own_step, rms  # noqa: E402


def main() -> None:
    rows, cols = 256, 4096
    print(f"{'type':>6} {'kept as':>8} {'own rms':>10} {'int8 rms':>10} {'int4g32 rms':>12} {'ratio kept/own':>15}")
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0):
        raw = blocks(qtype, rows, cols, np.random.default_rng(int(qtype)))
        w = gguf.quants.dequantize(raw, qtype)
        int8 = rms(quantize_int8(torch.from_numpy(w)).dequantize().numpy() - w)
        if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K):
            packed = repack_int4(torch.from_numpy(raw), int(qtype), cols)
            lin = Int4Linear(cols, rows, 32)
            lin.load(packed)
            int4 = rms(lin.dequantize(torch.float64).numpy() - w)  # only the bf16 rounding of scale and zero
        else:
            int4 = rms(quantize_int4(torch.from_numpy(w), 32).dequantize().numpy() - w)
        own = rms(own_step(qtype, raw)) / np.sqrt(12)
        kept = native_format(qtype)
        ratio = (int8 if kept == "int8" else int4) / own
        print(f"{qtype.name:>6} {kept:>8} {own:10.3e} {int8:10.3e} {int4:12.3e} {ratio:15.2f}")


if __name__ == "__main__":
    main()
