"""Every error row of the Workers AI API reference that applies, checked exactly (status, code, message, envelope),
plus what clients get wrong (bad JSON, wrong content types, wrong types, out-of-range numbers): never a 500.
Also: a client that leaves (mid-stream, or while waiting for a non-streamed answer) leaves nothing running.

Server: the demo model (SmolLM2-135M-Instruct GGUF, float32) on a real uvicorn; expected token counts come from
transformers' tokenizer of the same GGUF.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures_text import demo_gguf_path
from tests.http_fixtures import LiveServer, live_server, strip_request_id

pytestmark = pytest.mark.slow

NAME = "@hf/huggingfacetb/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    with live_server() as s:
        yield s


@pytest.fixture()
def settings_restored(srv: LiveServer) -> Iterator[LiveServer]:
    """Lets a test change the live server's settings; restores them afterwards."""
    s = srv.settings
    saved = (s.max_body_bytes, s.request_timeout_s, s.max_concurrent_requests, s.account_id)
    yield srv
    s.max_body_bytes, s.request_timeout_s, s.max_concurrent_requests, s.account_id = saved
    assert srv.wait_idle(5.0).num_running == 0


def error(r: httpx.Response, status: int, code: int) -> str:
    """Checks the error envelope and returns its message."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"result", "success", "errors", "messages"}
    assert body["result"] is None and body["success"] is False and body["messages"] == []
    assert len(body["errors"]) == 1 and set(body["errors"][0]) == {"code", "message"}
    assert body["errors"][0]["code"] == code, body
    return strip_request_id(body["errors"][0]["message"], r.headers["x-request-id"])


def bad_input(r: httpx.Response, *needles: str) -> str:
    msg = error(r, 400, 5006)
    assert msg.startswith("AiError: Bad input: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def post(srv: LiveServer, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(kw.pop("url", srv.run_url()), json=body, timeout=60, **kw)


# ---------------------------------------------------------------- the table of the API reference

def test_unknown_model_5007(srv: LiveServer) -> None:
    r = post(srv, {"prompt": "hi"}, url=srv.run_url("@cf/meta/llama-3-8b-instruct"))
    assert error(r, 400, 5007) == "No such model @cf/meta/llama-3-8b-instruct or task"
    r = httpx.get(srv.url + "/client/v4/accounts/local/ai/models/schema", params={"model": "@hf/x/y"})
    assert error(r, 400, 5007) == "No such model @hf/x/y or task"


def test_context_window_5021_names_both_numbers(srv: LiveServer) -> None:
    from transformers import AutoTokenizer

    gguf = demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    n_prompt = len(tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
    for max_tokens in (2048, 10**6):
        r = post(srv, {"prompt": "Hello", "max_tokens": max_tokens})
        assert error(r, 413, 5021) == (
            f"AiError: Ai: The estimated number of input and maximum output tokens ({n_prompt + max_tokens}) "
            f"exceeded this model context window limit (2048)."
        )
    # the largest request that fits is served
    r = post(srv, {"prompt": "Hello", "max_tokens": 2048 - n_prompt, "temperature": 0})
    assert r.status_code == 200, r.text


def test_unknown_routes_7003(srv: LiveServer) -> None:
    for method, path in [("GET", "/nope"), ("POST", "/client/v4/accounts/local/ai/nope"),
                         ("GET", "/client/v4/accounts/local/ai/models"), ("DELETE", "/v2/chat")]:
        r = httpx.request(method, srv.url + path)
        assert error(r, 404, 7003) == f"Could not route to {path}, perhaps your object identifier is invalid?"


def test_wrong_method_is_an_enveloped_405(srv: LiveServer) -> None:
    r = httpx.get(srv.run_url())
    assert "not allowed" in error(r, 405, 7001) and r.headers["allow"] == "POST"
    r = httpx.request("TRACE", srv.url + "/v1/models")
    assert error(r, 405, 7001) == "Method TRACE not allowed for /v1/models" and r.headers["allow"] == "GET"


def test_unknown_account_7003_when_an_account_is_configured(settings_restored: LiveServer) -> None:
    srv = settings_restored
    srv.settings.account_id = "acc-1"
    assert post(srv, {"prompt": "x", "max_tokens": 1}, url=srv.run_url(account="acc-1")).status_code == 200
    path = f"/client/v4/accounts/acc-2/ai/run/{NAME}"
    r = post(srv, {"prompt": "x", "max_tokens": 1}, url=srv.url + path)
    assert error(r, 404, 7003) == f"Could not route to {path}, perhaps your object identifier is invalid?"


def test_invalid_input_3010(srv: LiveServer) -> None:
    prefix = "Invalid or incomplete input for the model: "
    assert error(post(srv, {"messages": []}), 400, 3010).startswith(prefix)
    msg = error(post(srv, {"messages": [{"role": "wizard", "content": "hi"}]}), 400, 3010)
    assert msg.startswith(prefix) and "wizard" in msg
    msg = error(post(srv, {"prompt": "x", "response_format": {"type": "json_object"}}), 400, 3010)
    assert msg.startswith(prefix) and "JSON mode" in msg
    tool = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    msg = error(post(srv, {"messages": [{"role": "user", "content": "x"}], "tools": [tool]}), 400, 3010)
    assert msg.startswith(prefix) and "tools" in msg


def test_lora_without_adapter_support_5005(srv: LiveServer) -> None:
    r = post(srv, {"prompt": "hi", "lora": "my-finetune"})
    assert error(r, 405, 5005) == f"The model {NAME} does not support LoRa inference"
    assert post(srv, {"prompt": "hi", "lora": "", "max_tokens": 1}).status_code == 200  # empty: no adapter


def test_body_too_large_3006(settings_restored: LiveServer) -> None:
    srv = settings_restored
    srv.settings.max_body_bytes = 1000
    r = post(srv, {"prompt": "x" * 2000})
    assert error(r, 413, 3006) == "Request is too large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 100
        yield b'"}'

    r = httpx.post(srv.run_url(), content=chunks(), headers={"content-type": "application/json"})
    assert error(r, 413, 3006) == "Request is too large"


def test_capacity_3040_with_retry_after(settings_restored: LiveServer) -> None:
    srv = settings_restored
    srv.settings.max_concurrent_requests = 1
    body = {"prompt": "Go", "raw": True, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.run_url(), json=body) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        r = post(srv, {"prompt": "hi", "max_tokens": 1})
        assert error(r, 429, 3040) == "Capacity temporarily exceeded, please try again."
        assert r.headers["retry-after"] == "1"


def test_timeout_3007_aborts_the_request(settings_restored: LiveServer) -> None:
    srv = settings_restored
    srv.settings.request_timeout_s = 0.5
    r = post(srv, {"prompt": "Go", "raw": True, "max_tokens": 1000, "ignore_eos": True})
    assert error(r, 408, 3007) == "Request timeout"
    s = srv.wait_idle(1.0)
    assert (s.num_running, s.num_waiting, s.kv_blocks_used) == (0, 0, 0)


def test_unexpected_exceptions_are_enveloped_500_3001(srv: LiveServer) -> None:
    async def boom() -> None:
        raise RuntimeError("a bug")

    srv.app.add_api_route("/test-only/boom", boom, methods=["GET"])
    r = httpx.get(srv.url + "/test-only/boom")
    assert error(r, 500, 3001) == "Internal server error"
    assert "a bug" not in r.text


def test_a_dead_engine_gives_503(srv: LiveServer) -> None:
    srv.engine.is_dead = True
    try:
        assert httpx.get(srv.url + "/health").status_code == 503
        assert error(post(srv, {"prompt": "x"}), 503, 3001) == "Internal server error"
    finally:
        srv.engine.is_dead = False
    assert httpx.get(srv.url + "/health").status_code == 200


# ---------------------------------------------------------------- what clients send wrong: 400/5006, never 500

@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"prompt": 5}, ["/prompt", "string"]),
        ({"prompt": ""}, ["/prompt"]),
        ({"prompt": "x", "max_tokens": "ten"}, ["/max_tokens", "integer"]),
        ({"prompt": "x", "max_tokens": 2.5}, ["/max_tokens", "integer"]),
        ({"prompt": "x", "max_tokens": 0}, ["/max_tokens", "minimum"]),
        ({"prompt": "x", "max_tokens": True}, ["/max_tokens"]),
        ({"prompt": "x", "temperature": "hot"}, ["/temperature", "number"]),
        ({"prompt": "x", "temperature": 5.01}, ["/temperature", "maximum"]),
        ({"prompt": "x", "temperature": -0.1}, ["/temperature", "minimum"]),
        ({"prompt": "x", "top_p": 0}, ["/top_p", "minimum"]),
        ({"prompt": "x", "top_p": 1.5}, ["/top_p", "maximum"]),
        ({"prompt": "x", "top_k": 0}, ["/top_k", "minimum"]),
        ({"prompt": "x", "top_k": 51}, ["/top_k", "maximum"]),
        ({"prompt": "x", "top_k": 2.5}, ["/top_k", "integer"]),
        ({"prompt": "x", "seed": 0}, ["/seed", "minimum"]),
        ({"prompt": "x", "seed": 10**10}, ["/seed", "maximum"]),
        ({"prompt": "x", "repetition_penalty": 0}, ["/repetition_penalty"]),
        ({"prompt": "x", "repetition_penalty": 2.5}, ["/repetition_penalty", "maximum"]),
        ({"prompt": "x", "frequency_penalty": 3}, ["/frequency_penalty", "maximum"]),
        ({"prompt": "x", "presence_penalty": -3}, ["/presence_penalty", "minimum"]),
        ({"prompt": "x", "raw": "yes"}, ["/raw"]),
        ({"prompt": "x", "raw": 1}, ["/raw"]),
        ({"prompt": "x", "stream": "true"}, ["/stream", "boolean"]),
        ({"prompt": "x", "lora": 5}, ["/lora", "string"]),
        ({"prompt": "x", "response_format": "json"}, ["/response_format", "object"]),
        ({"prompt": "x", "response_format": {"type": "yaml"}}, ["/response_format/type"]),
        ({"prompt": "x", "ignore_eos": "no"}, ["/ignore_eos", "boolean"]),
        ({"messages": "hi"}, ["/messages", "array"]),
        ({"messages": [{"role": "user"}]}, ["/messages/0", "content"]),
        ({"messages": [{"content": "x"}]}, ["/messages/0", "role"]),
        ({"messages": [{"role": 1, "content": "x"}]}, ["/messages/0/role", "string"]),
        ({"messages": [{"role": "user", "content": 5}]}, ["/messages/0/content"]),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, ["/messages/0/content/0"]),
        ({"messages": [{"role": "user", "content": "x"}], "tools": "all"}, ["/tools", "array"]),
        ({"messages": [{"role": "user", "content": "x"}], "functions": [{}]}, ["/functions/0"]),
        ({}, ["exactly one of 'prompt' or 'messages'"]),
        ({"prompt": "x", "messages": []}, ["exactly one of 'prompt' or 'messages'"]),
        ([{"prompt": "x"}], ["JSON object"]),
        ("prompt", ["JSON object"]),
        (None, ["JSON object"]),
    ],
)
def test_schema_failures_name_the_field(srv: LiveServer, body: Any, needles: list[str]) -> None:
    bad_input(post(srv, body), *needles)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b'{"prompt": "x",}', "not valid JSON"),
        (b"NaN", "not valid JSON"),
        (b'{"prompt": "x", "temperature": Infinity}', "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_bodies(srv: LiveServer, raw: bytes, needle: str) -> None:
    r = httpx.post(srv.run_url(), content=raw, headers={"content-type": "application/json"}, timeout=60)
    bad_input(r, needle)


@pytest.mark.parametrize("ctype", ["multipart/form-data; boundary=x", "application/xml", "image/png",
                                   "application/octet-stream"])
def test_wrong_content_types(srv: LiveServer, ctype: str) -> None:
    r = httpx.post(srv.run_url(), content=json.dumps({"prompt": "x"}), headers={"content-type": ctype})
    bad_input(r, "Content-Type")


def test_invalid_content_length_is_refused(srv: LiveServer) -> None:
    with httpx.Client() as c:
        req = c.build_request("POST", srv.run_url(), content=b'{"prompt":"x"}')
        req.headers["content-length"] = "abc"
        try:
            r = c.send(req)
        except httpx.HTTPError:
            return  # the HTTP parser itself may refuse it before the app sees it; no 500 either way
    assert r.status_code == 400


WEIRD: list[Any] = [None, True, False, 0, -1, 1, 1.5, 1e308, -1e308, 2**64, "", "x", "true", "NaN", [], {}, [1],
                    {"a": 1}, "\u0000", "😀" * 3, [{"role": "user", "content": "x"}]]
FIELDS = ["prompt", "raw", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
          "frequency_penalty", "presence_penalty", "lora", "response_format", "ignore_eos", "messages", "tools"]


def test_no_combination_of_field_and_odd_value_gives_a_500(srv: LiveServer) -> None:
    seen: set[int] = set()
    with httpx.Client(timeout=60) as c:
        for field, value in itertools.product(FIELDS, WEIRD):
            body: dict[str, Any] = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
            body[field] = value
            if field == "messages":
                del body["prompt"]
            r = c.post(srv.run_url(), json=body)
            assert r.status_code < 500, (field, value, r.status_code, r.text)
            seen.add(r.status_code)
            if r.status_code != 200:
                assert r.json()["success"] is False
    assert {200, 400, 413} <= seen


# ---------------------------------------------------------------- clients that leave

def test_streaming_client_that_disconnects_leaves_nothing_running(srv: LiveServer) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.run_url(), json=body) as r:
        assert r.status_code == 200
        frames = 0
        for line in r.iter_lines():
            frames += line.startswith("data: ")
            if frames == 3:
                break
        assert srv.stats().num_running == 1
    s = srv.wait_idle(1.0)
    assert (s.num_running, s.num_waiting, s.kv_blocks_used) == (0, 0, 0)
    assert srv.state.active_requests == 0


def test_non_streaming_client_that_gives_up_leaves_nothing_running(srv: LiveServer) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.run_url(), json=body, timeout=httpx.Timeout(1.0, connect=5.0))
    assert time.monotonic() - started < 10
    s = srv.wait_idle(1.0)
    assert (s.num_running, s.num_waiting, s.kv_blocks_used) == (0, 0, 0)
    assert srv.state.active_requests == 0


@pytest.mark.parametrize("stream", [True, False])
def test_openai_clients_that_leave_leave_nothing_running(srv: LiveServer, stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500,
            "ignore_eos": True, "stream": stream}
    url = srv.url + "/v1/chat/completions"
    if stream:
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=httpx.Timeout(1.0, connect=5.0))
    s = srv.wait_idle(1.0)
    assert (s.num_running, s.num_waiting, s.kv_blocks_used) == (0, 0, 0)
