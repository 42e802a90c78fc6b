"""Reliability over HTTP on a real server (the demo model, float32, real uvicorn): overload and admission (429/3040),
rate limits (429/3021), the body cap (413/3006, with and without Content-Length), request timeouts (408/3007 and the
stream's error frame), model-step faults (500/3001 and the stream's error frame, then recovery), and a storm of
clients that disconnect mid-stream. After each: nothing left running, no KV block in use.

Reference outputs: the same greedy request served alone (continuous batching must not change a greedy output).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from airun.engine.llm_engine import LLMEngine
from tests.http_fixtures import LiveServer, live_server, strip_request_id

pytestmark = pytest.mark.slow

PROMPTS = ["Name three colors.", "What is 2 + 2?", "Write a haiku about rain.", "Say hello in French."]
CAPACITY_MESSAGE = "Capacity temporarily exceeded, please try again."


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    with live_server() as s:
        yield s


@pytest.fixture()
def fresh(srv: LiveServer) -> Iterator[LiveServer]:
    """Restores the settings a test changes, removes any fault hook, and checks the server ends idle."""
    s = srv.settings
    fields = ("max_waiting_requests", "max_queued_tokens", "rate_limit_rpm", "rate_limit_tpm", "request_timeout_s",
              "max_body_bytes")
    saved = {f: getattr(s, f) for f in fields}
    yield srv
    for f, v in saved.items():
        setattr(s, f, v)
    runner(srv).fault_hook = None
    stats = srv.wait_idle(5.0)
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert srv.state.admission.in_flight == 0 and srv.state.admission.queued_tokens == 0


def runner(srv: LiveServer) -> Any:
    engine: LLMEngine = srv.engine.engine
    return engine.runner


def body(prompt: str, max_tokens: int = 12, **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def envelope_error(r: httpx.Response) -> tuple[int, int, str]:
    data = r.json()
    assert data["success"] is False and data["result"] is None
    message = strip_request_id(data["errors"][0]["message"], r.headers["x-request-id"])
    return r.status_code, data["errors"][0]["code"], message


def sse_events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.split("\n\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def solo(srv: LiveServer, prompt: str, max_tokens: int = 12) -> str:
    r = httpx.post(srv.run_url(), json=body(prompt, max_tokens), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["result"]["response"]


# ---------------------------------------------------------------- admission
def test_overload_4x_completes_or_429(fresh: LiveServer) -> None:
    srv = fresh
    refs = {p: solo(srv, p) for p in PROMPTS}
    srv.settings.max_waiting_requests = 2
    admitted = srv.state.admission.batch_capacity + 2
    assert admitted == 10  # max_num_seqs 8 of the test engine, plus 2 waiting
    n = 4 * admitted

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, httpx.Response]:
        p = PROMPTS[i % len(PROMPTS)]
        return p, await client.post(srv.run_url(), json=body(p))

    async def storm() -> list[tuple[str, httpx.Response]]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    results = asyncio.run(storm())
    ok = refused = 0
    for p, r in results:
        if r.status_code == 200:
            ok += 1
            assert r.json()["result"]["response"] == refs[p]
        else:
            assert envelope_error(r) == (429, 3040, CAPACITY_MESSAGE)
            assert int(r.headers["retry-after"]) >= 1
            refused += 1
    assert ok + refused == n and ok >= 1 and refused >= 1


def test_queued_token_budget(fresh: LiveServer) -> None:
    srv = fresh
    srv.settings.max_queued_tokens = 200  # estimated as body bytes / 4
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", srv.run_url(), json=body("Count to fifty.", 400, stream=True, ignore_eos=True)) as s:
            assert s.status_code == 200
            frames = s.iter_bytes()  # held: a discarded iterator closes the response, which aborts the request
            first = next(frames)
            assert first.startswith(b'data: {"response"'), first
            big = body("word " * 200)  # > 800 bytes: more than the budget left
            assert srv.state.admission.in_flight == 1
            r = client.post(srv.run_url(), json=big)
            assert envelope_error(r) == (429, 3040, CAPACITY_MESSAGE)
            assert r.headers["retry-after"] == "1"
    srv.wait_idle(5.0)
    r = httpx.post(srv.run_url(), json=big, timeout=60)  # alone, even a request over the budget is admitted
    assert r.status_code == 200


def test_rate_limit_rpm_3021(fresh: LiveServer) -> None:
    srv = fresh
    srv.settings.rate_limit_rpm = 2
    codes = [httpx.post(srv.run_url(), json=body("Hi", 2), timeout=60) for _ in range(3)]
    assert [r.status_code for r in codes[:2]] == [200, 200]
    status, code, _ = envelope_error(codes[2])
    assert (status, code) == (429, 3021)
    assert 1 <= int(codes[2].headers["retry-after"]) <= 30  # one request refills in 60 / 2 s
    srv.settings.rate_limit_rpm = None


def test_rate_limit_tpm_3021(fresh: LiveServer) -> None:
    srv = fresh
    srv.settings.rate_limit_tpm = 60  # 1 estimated token a second
    payload = body("x" * 200, 2)  # ~ 60 estimated tokens: the whole minute's budget
    assert httpx.post(srv.run_url(), json=payload, timeout=60).status_code == 200
    r = httpx.post(srv.run_url(), json=payload, timeout=60)
    assert envelope_error(r)[:2] == (429, 3021)
    assert int(r.headers["retry-after"]) >= 30


# ---------------------------------------------------------------- body cap
def test_body_cap_413_with_and_without_length(fresh: LiveServer) -> None:
    srv = fresh
    assert srv.settings.max_body_bytes == 2**20
    huge = json.dumps(body("a" * (2 * 2**20))).encode()
    r = httpx.post(srv.run_url(), content=huge, headers={"content-type": "application/json"}, timeout=60)
    assert envelope_error(r) == (413, 3006, "Request is too large")

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length, the cap holds while reading
        yield b'{"prompt": "'
        for _ in range(32):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(srv.run_url(), content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert envelope_error(r) == (413, 3006, "Request is too large")


# ---------------------------------------------------------------- timeouts
def test_timeout_408_non_streamed(fresh: LiveServer) -> None:
    srv = fresh
    srv.settings.request_timeout_s = 0.3
    r = httpx.post(srv.run_url(), json=body("Tell me a story.", 1000, ignore_eos=True), timeout=60)
    assert envelope_error(r) == (408, 3007, "Request timeout")


def test_timeout_stream_sends_tokens_then_error_then_done(fresh: LiveServer) -> None:
    srv = fresh
    srv.settings.request_timeout_s = 1.5
    r = httpx.post(srv.run_url(), json=body("Tell me a story.", 1500, stream=True, ignore_eos=True), timeout=60)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    rid = r.headers["x-request-id"]
    assert events[-2] == {"result": None, "success": False, "messages": [],
                          "errors": [{"code": 3007, "message": f"Request timeout ({rid})"}]}
    tokens = [e for e in events[:-2] if e.get("response")]
    assert len(tokens) >= 1 and all("errors" not in e for e in events[:-2])


# ---------------------------------------------------------------- faults
def test_model_step_fault_fails_in_flight_then_recovers(fresh: LiveServer) -> None:
    srv = fresh
    ref = solo(srv, PROMPTS[0])
    scheduler = srv.engine.engine.scheduler
    fired: list[int] = []

    def fault() -> None:  # runs on the engine thread before each model step
        if not fired and len(scheduler.running) >= 2:
            fired.append(len(scheduler.running))
            raise RuntimeError("injected fault")

    runner(srv).fault_hook = fault

    async def both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            streamed = client.post(srv.run_url(), json=body("Tell me a story.", 300, stream=True, ignore_eos=True))
            plain = client.post(srv.run_url(), json=body("Tell me a joke.", 300, ignore_eos=True))
            return await asyncio.gather(streamed, plain)

    s, p = asyncio.run(both())
    assert fired, "the fault never fired"
    assert envelope_error(p) == (500, 3001, "Internal server error")
    if s.status_code == 200:  # the stream had started: an error frame, then [DONE]
        events = sse_events(s.text)
        assert events[-1] == "[DONE]"
        rid = s.headers["x-request-id"]
        assert events[-2]["errors"] == [{"code": 3001, "message": f"Internal server error ({rid})"}]
    else:
        assert envelope_error(s) == (500, 3001, "Internal server error")
    stats = srv.wait_idle(2.0)
    assert (stats.num_running, stats.kv_blocks_used) == (0, 0)
    assert solo(srv, PROMPTS[0]) == ref  # served on, same answer
    assert srv.engine.is_running and httpx.get(srv.url + "/health").status_code == 200


# ---------------------------------------------------------------- disconnects
def test_disconnect_storm_leaves_nothing_running(fresh: LiveServer) -> None:
    srv = fresh
    rng = random.Random(7)
    plan = [rng.randint(0, 6) for _ in range(50)]  # frames read before hanging up (0: before the first byte)

    async def client_that_leaves(frames: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            req = body("Tell me a long story.", 400, stream=True, ignore_eos=True)
            if frames == 0:
                task = asyncio.ensure_future(client.post(srv.run_url(), json=req))
                await asyncio.sleep(rng.random() * 0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return
            async with client.stream("POST", srv.run_url(), json=req) as r:
                seen = 0
                async for _ in r.aiter_raw():
                    seen += 1
                    if seen >= frames:
                        break

    async def storm() -> None:
        await asyncio.gather(*(client_that_leaves(f) for f in plan))

    asyncio.run(storm())
    stats = srv.wait_idle(2.0)
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert srv.state.active_requests == 0
