"""airun's Python client (``airun.client``), sync and async, against a real server (tiny random Mistral, with a
token). The reference for each answer is the same request sent with plain httpx."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airun.client import AI, AiRunError, AsyncAI
from airun.server.settings import ServerSettings
from tests.http_fixtures import LiveServer, live_server, small_engine_args

pytestmark = pytest.mark.slow

NAME = "@hf/test/tiny-mistral"
TOKEN = "client-secret"
INPUTS = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def srv(tiny_mistral_dir: Path) -> Iterator[LiveServer]:
    settings = ServerSettings(served_model_name=NAME, api_tokens=(TOKEN,))
    with live_server(small_engine_args(tiny_mistral_dir, max_model_len=512), settings) as s:
        yield s


@pytest.fixture(scope="module")
def reference(srv: LiveServer) -> dict[str, Any]:
    r = httpx.post(srv.run_url(), json=INPUTS, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200
    return r.json()["result"]


def test_sync_run(srv: LiveServer, reference: dict[str, Any]) -> None:
    with AI(srv.url, token=TOKEN) as ai:
        assert ai.run(NAME, INPUTS) == reference
        pieces = list(ai.run(NAME, INPUTS, stream=True))
        assert len(pieces) > 1 and "".join(pieces) == reference["response"]
        assert ai.last_usage == reference["usage"]


def test_sync_run_with_the_api_root_as_base_url(srv: LiveServer, reference: dict[str, Any]) -> None:
    with AI(srv.url + "/client/v4", token=TOKEN, account_id="my-account") as ai:
        assert ai.run(NAME, INPUTS) == reference
        assert [m["name"] for m in ai.models()] == [NAME]
        assert ai.schema(NAME)["input"]["oneOf"][1]["required"] == ["messages"]


def test_async_run(srv: LiveServer, reference: dict[str, Any]) -> None:
    async def go() -> tuple[Any, list[str], dict[str, int] | None]:
        async with AsyncAI(srv.url, token=TOKEN) as ai:
            full = await ai.run(NAME, INPUTS)
            stream = await ai.run(NAME, INPUTS, stream=True)
            pieces = [p async for p in stream]
            return full, pieces, ai.last_usage

    full, pieces, use = asyncio.run(go())
    assert full == reference
    assert "".join(pieces) == reference["response"] and use == reference["usage"]


@pytest.mark.parametrize(
    ("model", "inputs", "status", "code"),
    [
        ("@hf/nobody/nothing", {"prompt": "x"}, 400, 5007),
        (NAME, {"prompt": 5}, 400, 5006),
        (NAME, {"prompt": "x", "max_tokens": 100_000}, 413, 5021),
        (NAME, {"messages": [{"role": "assistant", "content": "x"}]}, 400, 3010),
        (NAME, {"prompt": "x", "lora": "ft"}, 405, 5005),
    ],
)
def test_errors_raise_with_status_code_and_message(srv: LiveServer, model: str, inputs: dict[str, Any], status: int,
                                                   code: int) -> None:
    with AI(srv.url, token=TOKEN) as ai:
        for stream in (False, True):
            with pytest.raises(AiRunError) as err:
                ai.run(model, inputs, stream=stream)  # streamed: the request is sent (and fails) at once
            assert (err.value.status, err.value.code) == (status, code)
            assert err.value.message

    async def go() -> AiRunError:
        async with AsyncAI(srv.url, token=TOKEN) as ai:
            try:
                await ai.run(model, inputs, stream=True)
            except AiRunError as e:
                return e
        raise AssertionError("no error")

    e = asyncio.run(go())
    assert (e.status, e.code) == (status, code)


def test_a_wrong_token_raises_10000(srv: LiveServer) -> None:
    with AI(srv.url, token="wrong") as ai, pytest.raises(AiRunError) as err:
        ai.run(NAME, INPUTS)
    assert (err.value.status, err.value.code) == (401, 10000)
    assert re.fullmatch(r"Authentication error \([0-9a-f]{32}\)", err.value.message), err.value.message


def test_leaving_a_stream_early_aborts_the_request(srv: LiveServer) -> None:
    with AI(srv.url, token=TOKEN) as ai:
        pieces = ai.run(NAME, {"prompt": "Go", "max_tokens": 400, "ignore_eos": True}, stream=True)
        next(pieces)
        pieces.close()
    s = srv.wait_idle(1.0)
    assert (s.num_running, s.kv_blocks_used) == (0, 0)
