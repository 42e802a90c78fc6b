"""One airun measurement run in its own process; prints one JSON line. Used by bench_engine.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import long_prompt_text, measure, topics  # noqa: E402
from airun.engine.args import EngineArgs  # noqa: E402
from airun.engine.llm_engine import LLMEngine  # noqa: E402
from airun.sampling_params import SamplingParams  # noqa: E402


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, float]:
    """Submits all prompts at once; returns (seconds, generated tokens, mean time to first token)."""
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}-{t0}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    n = 0
    while engine.has_unfinished():
        for o in engine.step():
            n += len(o.token_ids)
            first.setdefault(o.request_id, time.perf_counter() - t0)
    return time.perf_counter() - t0, n, sum(first.values()) / max(1, len(first))


def bench_prompts(engine: LLMEngine, n: int) -> dict[str, list]:
    """The benchmark's prompts as token ids: ``n`` chat-templated story requests and a 1,000-token raw text."""
    tok = engine.tokenizer
    chat = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in topics(n)]
    return {"chat": chat, "long": tok.encode(long_prompt_text())[:1000]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompts", default=None, help="JSON {chat: [[ids]...], long: [ids]} (default: built here)")
    a = ap.parse_args()
    kw = dict(model=a.model, dtype=a.dtype, threads=a.threads, show_progress=False, max_num_batched_tokens=1024)
    if a.quantize:
        kw["quantize"] = a.quantize
    t = time.perf_counter()
    engine = LLMEngine(EngineArgs(**kw))
    load_s = time.perf_counter() - t
    conc = [int(x) for x in a.concurrency.split(",")]
    prompts = json.load(open(a.prompts)) if a.prompts else bench_prompts(engine, max(conc))
    engine.args.enable_prefix_caching = False
    engine.kv.enable_prefix_caching = False  # a fair prefill and fair batches: nothing reused from earlier runs
    res: dict = {"engine": "airun", "dtype": a.dtype, "quantize": a.quantize, "load_s": round(load_s, 2)}
    res |= measure(lambda ps, n: run(engine, ps, n), prompts, a.max_tokens, conc)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
