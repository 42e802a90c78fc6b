"""End-to-end speed of the demo model per weight format: prefill of a long prompt and greedy decode at batch 1 and 8.

Each configuration loads its own engine; every timing is the minimum of ``--reps`` runs (the machine may be shared).

    python bench/quant_decode.py [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airun.engine.args import EngineArgs  # noqa: E402
from airun.engine.llm_engine import LLMEngine  # noqa: E402
from airun.sampling_params import SamplingParams  # noqa: E402
from bench.common import long_prompt_text  # noqa: E402

CONFIGS = {
    "float32": dict(dtype="float32"),
    "bf16 (dequantized)": dict(dtype="bfloat16", quantize="none"),
    "auto (GGUF classes)": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantize="int8"),
}


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> float:
    engine.kv.reset_prefix_cache()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ns = ap.parse_args()
    rows = []
    for name, kw in CONFIGS.items():
        engine = LLMEngine(EngineArgs(model=ns.model, threads=ns.threads, kv_cache_memory_gb=0.5, show_progress=False,
                                      **kw))  # type: ignore[arg-type]
        long_ids = engine.tokenizer.encode(long_prompt_text(400))[:512]
        short = [engine.tokenizer.encode(f"Tell me a story about the number {i}.") for i in range(8)]
        prefill = min(run(engine, [long_ids], 1) for _ in range(ns.reps))
        dec1 = min(run(engine, short[:1], 33) - run(engine, short[:1], 1) for _ in range(ns.reps)) / 32
        dec8 = min(run(engine, short, 33) - run(engine, short, 1) for _ in range(ns.reps)) / 32
        r = {"config": name, "prefill_512_s": round(prefill, 3), "decode_ms_per_step_b1": round(dec1 * 1e3, 1),
             "decode_ms_per_step_b8": round(dec8 * 1e3, 1)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\nthreads={ns.threads}")
    print(f"{'config':>20} {'prefill 512 tok (s)':>20} {'decode b=1 (ms/step)':>21} {'decode b=8 (ms/step)':>21}")
    for r in rows:
        print(f"{r['config']:>20} {r['prefill_512_s']:20.3f} {r['decode_ms_per_step_b1']:21.1f} "
              f"{r['decode_ms_per_step_b8']:21.1f}")


if __name__ == "__main__":
    main()
