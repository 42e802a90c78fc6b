"""The server process's life: a SIGTERM drain on a real ``airun serve`` subprocess (in-flight streams finish or end,
new requests get 503, exit status 0); ``exit_on_engine_error`` (a model-step fault kills the engine, /health says
503 and the server stops with exit code 1); and preemption under KV pressure (greedy outputs equal solo outputs).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from airun.engine.async_engine import AsyncEngine
from airun.server.app import create_app
from airun.server.lifecycle import DrainingServer
from airun.server.settings import ServerSettings
from tests.fixtures_text import demo_gguf_path
from tests.http_fixtures import _free_socket, live_server, small_engine_args, without_request_id

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def run_body(prompt: str, max_tokens: int, **kw: object) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def test_sigterm_drains_and_exits_zero() -> None:
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "airun", "serve", "--model", str(demo_gguf_path()), "--dtype", "float32",
           "--max-model-len", "1024", "--kv-cache-memory-gb", "0.1", "--threads", "1", "--port", str(port),
           "--shutdown-grace-seconds", "2", "--no-playground"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        run_url = f"{url}/client/v4/accounts/local/ai/run/{model}"

        async def scenario() -> tuple[list[str], httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                async def stream(max_tokens: int) -> str:
                    body = run_body("Tell me a story.", max_tokens, stream=True, ignore_eos=True)
                    async with client.stream("POST", run_url, json=body) as r:
                        assert r.status_code == 200
                        return (await r.aread()).decode()

                short = asyncio.ensure_future(stream(8))  # finishes within the grace period
                long = asyncio.ensure_future(stream(900))  # does not: aborted when the grace ends
                await asyncio.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with httpx.AsyncClient(timeout=10) as other:  # a new connection while draining
                    refused = await other.post(run_url, json=run_body("Hi", 2))
                    health = await other.get(url + "/health")
                return list(await asyncio.gather(short, long)), refused, health

        texts, refused, health = asyncio.run(scenario())
        assert refused.status_code == 503
        assert without_request_id(refused)["errors"] == [{"code": 3040, "message": "Capacity temporarily exceeded, please try again."}]
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        for text in texts:  # each ended properly: a usage frame, then [DONE]
            frames = [f for f in text.split("\n\n") if f]
            assert frames[-1] == "data: [DONE]"
            assert "usage" in json.loads(frames[-2][len("data: "):])
        long_usage = json.loads([f for f in texts[1].split("\n\n") if f][-2][len("data: "):])["usage"]
        assert long_usage["completion_tokens"] < 900  # cut short by the abort
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_on_engine_error_stops_with_status_1() -> None:
    engine = AsyncEngine.from_args(small_engine_args())
    app = create_app(engine, ServerSettings(exit_on_engine_error=True))
    sock = _free_socket()
    port = sock.getsockname()[1]
    server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="on"), app.state.airun)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        name = app.state.airun.model.name

        def fault() -> None:
            raise RuntimeError("injected fault")

        engine.engine.runner.fault_hook = fault
        r = httpx.post(f"{url}/client/v4/accounts/local/ai/run/{name}", json=run_body("Hi", 4), timeout=30)
        assert r.status_code == 500 and r.json()["errors"][0]["code"] == 3001
        assert engine.is_dead
        thread.join(10)
        assert not thread.is_alive() and server.exit_code == 1
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_preemption_under_kv_pressure_keeps_greedy_outputs() -> None:
    # 8 blocks of 16 tokens for 4 requests of ~60 tokens each (4 blocks): they cannot all stay resident
    block_bytes = 16 * 30 * 2 * 3 * 64 * 4  # tokens * layers * (k, v) * kv heads * head dim * float32
    args = small_engine_args(kv_cache_memory_gb=8 * block_bytes / 2**30, max_model_len=128)
    prompts = ["Name three colors.", "What is 2 + 2?", "Write a haiku about rain.", "Say hello in French."]
    with live_server(args) as srv:
        assert srv.engine.engine.kv.num_blocks == 8

        def post(client: httpx.Client, p: str) -> str:
            r = client.post(srv.run_url(), json=run_body(p, 24, ignore_eos=True))
            assert r.status_code == 200, r.text
            return r.json()["result"]["response"]

        with httpx.Client(timeout=120) as client:
            alone = [post(client, p) for p in prompts]

        async def together() -> list[str]:
            async with httpx.AsyncClient(timeout=120) as client:
                rs = await asyncio.gather(*(client.post(srv.run_url(), json=run_body(p, 24, ignore_eos=True))
                                            for p in prompts))
            return [r.json()["result"]["response"] for r in rs]

        assert asyncio.run(together()) == alone
        stats = srv.wait_idle(2.0)
        assert stats.num_preemptions > 0 and stats.kv_blocks_used == 0
