"""HTTP benchmark: concurrent streaming clients on the Workers AI route vs the engine in-process.

Usage: python bench/bench_http.py [--dtype bfloat16] [--threads 2] [--concurrency 1,8,32] [--max-tokens 128]
Starts `airun serve` on a free loopback port in a subprocess, measures time to first token, inter-token latency and
aggregate tok/s with N concurrent streaming clients (greedy, fixed length), then measures the same workload in-process
(bench/airun_worker.py) and prints both with the HTTP/in-process ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.common import ROOT, ratio, run_child, topics  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line[6:])
            if frame.get("response"):
                stamps.append(time.perf_counter())
            if frame.get("usage"):
                usage = frame["usage"]
    ttft = stamps[0] - t0 if stamps else float("nan")
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": ttft, "itl": itl, "tokens": (usage or {}).get("completion_tokens", len(stamps)),
            "end": time.perf_counter()}


async def load(base: str, model: str, n: int, max_tokens: int) -> dict:
    url = f"{base}/client/v4/accounts/bench/ai/run/{model}"
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_client(client, url, p, max_tokens) for p in topics(n)))
        secs = max(r["end"] for r in res) - t0
    itl = [x for r in res for x in r["itl"]]
    return {
        "agg_tok_s": round(sum(r["tokens"] for r in res) / secs, 1),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in res), 3),
        "itl_p50_ms": round(statistics.median(itl) * 1e3, 2) if itl else None,
        "itl_p99_ms": round(sorted(itl)[int(0.99 * (len(itl) - 1))] * 1e3, 2) if itl else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    from airun.loader.demo import demo_model_path

    model_path = a.model or str(demo_model_path())
    port = free_port()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "airun", "serve", "--model", model_path, "--port", str(port), "--dtype", a.dtype,
           "--threads", str(a.threads)]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read().decode()[-3000:])
            time.sleep(0.5)
        models = httpx.get(f"{base}/client/v4/accounts/bench/ai/models/search", timeout=10).json()["result"]
        name = models[0]["name"]
        asyncio.run(load(base, name, 2, 8))  # warm-up
        http = {c: asyncio.run(load(base, name, c, a.max_tokens)) for c in map(int, a.concurrency.split(","))}
    finally:
        server.terminate()
        server.wait(30)
    inproc = run_child(["bench/airun_worker.py", "--model", model_path, "--dtype", a.dtype, "--threads",
                        str(a.threads), "--concurrency", a.concurrency, "--max-tokens", str(a.max_tokens)])
    print(f"{a.threads} threads, dtype {a.dtype}, {a.max_tokens} tokens per request, greedy")
    print("| clients | HTTP agg tok/s | in-process agg tok/s | HTTP / in-process | TTFT p50 (s) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for c, h in http.items():
        e = inproc.get(f"agg_tok_s_{c}")
        print(f"| {c} | {h['agg_tok_s']} | {e} | {ratio(h['agg_tok_s'], e)} | {h['ttft_p50_s']} | "
              f"{h['itl_p50_ms']} / {h['itl_p99_ms']} |")
    print(json.dumps({"http": http, "in_process": inproc}))


if __name__ == "__main__":
    main()
