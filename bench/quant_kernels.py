"""Times the quantized linears' two paths (the int8 / int4 kernel, and dequantize-per-tile + dense matmul) against a
bf16 ``F.linear`` for the demo model's weight shapes and a range of row counts M; picks the row thresholds of
``airun/layers/quant.py``.

Each number is the minimum over repeated runs (the machine is shared, so the minimum is the least noisy statistic).

    python bench/quant_kernels.py [--threads 1] [--reps 15] [--shapes demo|mistral]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airun.layers.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8  # noqa: E402

SHAPES = {
    "demo": {"o_proj 576x576": (576, 576), "qkv 960x576": (960, 576), "gate_up 3072x576": (3072, 576),
             "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)},
    "mistral": {"o_proj 4096x4096": (4096, 4096), "qkv 6144x4096": (6144, 4096), "down 4096x14336": (4096, 14336)},
}
ROWS = (1, 4, 8, 16, 32, 64, 128, 256)


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shapes", default="demo", choices=sorted(SHAPES))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in ns.rows.split(",")]
    results = []
    print(f"threads={ns.threads}  times in ms (min of {ns.reps})")
    print(f"{'shape':>20} {'M':>4} {'bf16':>8} {'i8 kern':>8} {'i8 deq':>8} {'i4 kern':>8} {'i4 deq':>8}")
    with torch.inference_mode():
        for name, (n, k) in SHAPES[ns.shapes].items():
            w = torch.randn(n, k) * 0.05
            wb = w.bfloat16()
            m8 = Int8Linear(k, n)
            m8.load_rows(0, quantize_int8(w))
            m4 = Int4Linear(k, n, 32)
            m4.load(quantize_int4(w, 32))
            del w
            reps = max(3, ns.reps // 3) if n * k > 20_000_000 else ns.reps
            for m in rows:
                x = torch.randn(m, k).bfloat16()
                r = {
                    "bf16": best_ms(lambda: F.linear(x, wb), reps),
                    "i8_kernel": best_ms(lambda: m8.kernel_matmul(x), reps),
                    "i8_dequant": best_ms(lambda: m8.dequant_matmul(x), reps),
                    "i4_kernel": best_ms(lambda: m4.kernel_matmul(x), reps),
                    "i4_dequant": best_ms(lambda: m4.dequant_matmul(x), reps),
                }
                results.append({"shape": name, "M": m, **{key: round(v, 4) for key, v in r.items()}})
                print(f"{name:>20} {m:>4} " + " ".join(f"{v:8.3f}" for v in r.values()), flush=True)
    print(json.dumps({"threads": ns.threads, "results": results}))


if __name__ == "__main__":
    main()
