"""Engine benchmark on the demo model: airun in-process vs HF transformers generate(), same weights, dtype, threads.

Usage: python bench/bench_engine.py [--dtype bfloat16] [--threads 2] [--skip-hf]
Prints a Markdown table (paste it into bench/RESULTS.md with the command line).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FIELDS, ratio, run_child  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    from airun.loader.demo import demo_model_path

    gguf = str(demo_model_path())
    common = ["--dtype", a.dtype, "--threads", str(a.threads)]
    air_args = ["bench/airun_worker.py", "--model", gguf, *common]
    if a.quantize:
        air_args += ["--quantize", a.quantize]
    air = run_child(air_args)
    hf = None if a.skip_hf else run_child(["bench/hf_worker.py", "--gguf", gguf, *common])
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, dtype {a.dtype}"
          + (f", airun --quantize {a.quantize}" if a.quantize else ""))
    print("| figure | airun | transformers | ratio |")
    print("|---|---|---|---|")
    for key, label in FIELDS:
        h = hf.get(key) if hf else None
        r = ratio(h, air.get(key)) if key == "peak_rss_mib" else ratio(air.get(key), h)
        note = " (transformers / airun)" if key == "peak_rss_mib" else ""
        print(f"| {label} | {air.get(key)} | {h} | {r}{note} |")
    print(json.dumps({"airun": air, "transformers": hf}))


if __name__ == "__main__":
    main()
