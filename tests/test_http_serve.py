"""`airun serve` as a real process: it answers /health 503 while the model loads and 200 once it serves, serves the
Workers AI route, stops on SIGINT, and exits with status 1 when the model cannot be loaded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.http_fixtures import without_request_id

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "AIRUN_API_TOKEN": ""}
    return subprocess.Popen([sys.executable, "-m", "airun", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_serve_loads_serves_and_stops(tiny_mistral_dir: Path) -> None:
    port = free_port()
    proc = serve("--model", str(tiny_mistral_dir), "--port", str(port), "--dtype", "float32", "--max-model-len",
                 "256", "--kv-cache-memory-gb", "0.01", "--threads", "1", "--served-model-name", "@hf/t/tiny",
                 "--api-token", "tok")
    url = f"http://127.0.0.1:{port}"
    try:
        statuses: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=5).status_code)
            except httpx.TransportError:
                pass
            if statuses and statuses[-1] == 200:
                break
            time.sleep(0.05)
        assert statuses and statuses[-1] == 200, statuses
        assert set(statuses) <= {503, 200}
        r = httpx.post(url + "/client/v4/accounts/a/ai/run/@hf/t/tiny", json={"prompt": "hi", "max_tokens": 3},
                       headers={"Authorization": "Bearer tok"}, timeout=60)
        assert r.status_code == 200 and r.json()["result"]["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/ai/run/@hf/t/tiny", json={"prompt": "hi"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), out
    assert "Application shutdown complete" in out


def test_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    proc = serve("--model", str(tmp_path / "missing"), "--port", str(free_port()))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "could not be loaded" in out and "missing" in out


def test_health_is_503_while_the_model_loads_and_after_a_failed_load(tiny_mistral_dir: Path) -> None:
    import threading

    from airun.engine.async_engine import AsyncEngine
    from airun.errors import ModelLoadError
    from airun.server.app import create_app
    from airun.server.settings import ServerSettings
    from tests.http_fixtures import serve_app, small_engine_args

    go = threading.Event()

    def load_when_told() -> AsyncEngine:
        go.wait(60)
        return AsyncEngine.from_args(small_engine_args(tiny_mistral_dir, max_model_len=256))

    app = create_app(None, ServerSettings(served_model_name="@hf/t/tiny"), loader=load_when_told)
    with serve_app(app) as (url, _):
        r = httpx.get(url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        r = httpx.post(url + "/ai/run/@hf/t/tiny", json={"prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert without_request_id(r)["errors"] == [{"code": 3040, "message": "Capacity temporarily exceeded, please try again."}]
        go.set()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": "@hf/t/tiny"}
        assert httpx.post(url + "/ai/run/@hf/t/tiny", json={"prompt": "hi", "max_tokens": 2}).status_code == 200

    failures: list[BaseException] = []

    def broken() -> AsyncEngine:
        raise ModelLoadError("no such checkpoint")

    app = create_app(None, ServerSettings(), loader=broken, on_load_error=failures.append)
    with serve_app(app) as (url, _):
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [str(f) for f in failures] == ["no such checkpoint"]
        r = httpx.get(url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "error"})
        r = httpx.post(url + "/ai/run/@hf/x/y", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["errors"][0]["code"] == 3001
