"""One airun measurement run in its own process; prints one JSON line. Used by bench_engine.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import long_prompt_text, peak_rss_mib, topics  # noqa: E402
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
    run(engine, [prompts["chat"][0][:8]], 8)  # warm-up
    res: dict = {"engine": "airun", "dtype": a.dtype, "quantize": a.quantize, "load_s": round(load_s, 2)}
    secs, n, _ = run(engine, [prompts["chat"][0]], a.max_tokens)
    res["decode_tok_s"] = round(n / secs, 1)
    long_ids = prompts["long"]
    engine.args.enable_prefix_caching = False
    engine.kv.enable_prefix_caching = False  # a fair prefill: nothing reused from earlier runs
    secs, _, ttft = run(engine, [long_ids], 1)
    res["prefill_tokens"] = len(long_ids)
    res["prefill_tok_s"] = round(len(long_ids) / ttft, 1)
    for c in conc:
        secs, n, ttft = run(engine, prompts["chat"][:c], a.max_tokens)
        res[f"agg_tok_s_{c}"] = round(n / secs, 1)
        res[f"ttft_s_{c}"] = round(ttft, 3)
    res["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
