"""Soak test (not in CI): ``airun serve`` on the demo model, driven at twice its sustainable request rate by streaming
clients, some of which hang up mid-stream.

    python bench/soak.py --minutes 10            # starts its own server (demo model)
    python bench/soak.py --url http://host:8787 --pid 1234 --minutes 2

Phases: (1) calibration: ``--calib-concurrency`` closed-loop clients for ``--calib-seconds``; the completed requests a
second is the sustainable rate; (2) soak: Poisson arrivals at ``--overload`` times that rate for ``--minutes``.
Reports requests served, 429s, other errors (the bar: 0), disconnects, p50/p99 time to first token, and the server's
RSS after calibration, after the soak's first 20% (its warm-up at full load: the start of the growth measure) and at
the end (the bar: growth < 5%). Prints one JSON object; exits 1 if a bar is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me about the sea.", "Name three colors.", "Write a short poem about trees.", "What is a CPU?",
           "Explain rain to a child.", "List some fruits."]


@dataclass(slots=True)
class Tally:
    served: int = 0
    refused_429: int = 0
    errors: int = 0
    disconnected: int = 0
    ttft_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, tally: Tally, hang_up_p: float,
              max_tokens: int) -> None:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "stream": True, "temperature": 0.7,
            "seed": rng.randrange(1 << 30)}
    leave_after = rng.randint(1, 8) if rng.random() < hang_up_p else None
    t0 = time.monotonic()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code == 429:
                tally.refused_429 += 1
                await r.aread()
                return
            if r.status_code != 200:
                tally.errors += 1
                tally.error_samples.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                return
            frames = 0
            first = True
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first:
                    tally.ttft_s.append(time.monotonic() - t0)
                    first = False
                if '"errors"' in line:
                    tally.errors += 1
                    tally.error_samples.append(line[:200])
                    return
                if line == "data: [DONE]":
                    tally.served += 1
                    return
                frames += 1
                if leave_after is not None and frames >= leave_after:
                    tally.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
            tally.errors += 1
            tally.error_samples.append("stream ended without [DONE]")
    except httpx.HTTPError as e:
        tally.errors += 1
        tally.error_samples.append(f"{type(e).__name__}: {e}")


async def calibrate(url: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    tally = Tally()
    rng = random.Random(1)
    deadline = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            await one(client, url, rng, tally, 0.0, max_tokens)

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return tally.served / (time.monotonic() - t0)


async def soak(url: str, rate: float, seconds: float, hang_up_p: float, max_tokens: int) -> Tally:
    tally = Tally()
    rng = random.Random(2)
    tasks: set[asyncio.Task[None]] = set()
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=4096)) as client:
        while time.monotonic() < deadline:
            t = asyncio.ensure_future(one(client, url, rng, tally, hang_up_p, max_tokens))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(rate))
        if tasks:
            await asyncio.gather(*tasks)
    return tally


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--url", default=None, help="a running server (default: start one on the demo model)")
    ap.add_argument("--pid", type=int, default=None, help="its process id, for RSS (with --url)")
    ap.add_argument("--model", default=None, help="the model to serve (default: the demo model)")
    ap.add_argument("--overload", type=float, default=2.0, help="arrival rate / sustainable rate")
    ap.add_argument("--hang-up", type=float, default=0.2, help="share of clients that disconnect mid-stream")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--calib-concurrency", type=int, default=8)
    ap.add_argument("--calib-seconds", type=float, default=30.0)
    ap.add_argument("--server-args", default="--max-waiting-requests 16",
                    help="extra flags for the server it starts")
    args = ap.parse_args()

    proc: subprocess.Popen[bytes] | None = None
    url, pid = args.url, args.pid
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "airun", "--log-level", "WARNING", "serve", "--port", str(port),
               *(["--model", args.model] if args.model else []), *args.server_args.split()]
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        url, pid = f"http://127.0.0.1:{port}", proc.pid
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise SystemExit("the server did not come up")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        run_url = f"{url}/client/v4/accounts/local/ai/run/{model}"
        sustainable = asyncio.run(calibrate(run_url, args.calib_concurrency, args.calib_seconds, args.max_tokens))
        rss_calibrated = rss_bytes(pid) if pid else None
        rate = max(0.1, sustainable * args.overload)
        t0 = time.monotonic()
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:  # RSS every second; the soak's first 20% is its warm-up
            while pid and not stop.wait(1.0):
                samples.append((time.monotonic() - t0, rss_bytes(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tally = asyncio.run(soak(run_url, rate, args.minutes * 60, args.hang_up, args.max_tokens))
        stop.set()
        sampler.join()
        warm = [r for t, r in samples if t >= 0.2 * args.minutes * 60]
        rss_start = warm[0] if warm else rss_calibrated
        elapsed = time.monotonic() - t0
        time.sleep(2.0)
        rss_end = rss_bytes(pid) if pid else None
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    growth = (rss_end - rss_start) / rss_start if rss_start and rss_end else None
    report = {
        "minutes": round(elapsed / 60, 2),
        "sustainable_rps": round(sustainable, 3),
        "offered_rps": round(rate, 3),
        **{k: v for k, v in asdict(tally).items() if k not in ("ttft_s", "error_samples")},
        "error_samples": tally.error_samples[:5],
        "ttft_p50_s": percentile(tally.ttft_s, 50),
        "ttft_p99_s": percentile(tally.ttft_s, 99),
        "rss_after_calibration_mb": rss_calibrated and round(rss_calibrated / 2**20, 1),
        "rss_start_mb": rss_start and round(rss_start / 2**20, 1),  # after the soak's first 20% (warm-up)
        "rss_end_mb": rss_end and round(rss_end / 2**20, 1),
        "rss_growth": growth and round(growth, 4),
        "server_exit_code": proc.returncode if proc is not None else None,
    }
    print(json.dumps(report, indent=2))
    ok = tally.errors == 0 and (growth is None or growth < 0.05)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
