"""Bearer-token authentication on a real server (tiny random Mistral): every route but /health needs a valid token in
the Authorization header; nothing else (query string, other schemes, encoded paths) gets through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from airun.server.settings import ServerSettings
from tests.http_fixtures import LiveServer, live_server, small_engine_args, without_request_id

pytestmark = pytest.mark.slow

TOKENS = ("first-secret", "second-secret")
UNAUTHORIZED = {"result": None, "success": False, "errors": [{"code": 10000, "message": "Authentication error"}],
                "messages": []}


@pytest.fixture(scope="module")
def srv(tiny_mistral_dir: Path) -> Iterator[LiveServer]:
    settings = ServerSettings(served_model_name="@hf/test/tiny-mistral", api_tokens=TOKENS)
    with live_server(small_engine_args(tiny_mistral_dir, max_model_len=512), settings) as s:
        yield s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert without_request_id(r) == UNAUTHORIZED
    assert r.headers["x-request-id"]


def test_health_needs_no_token(srv: LiveServer) -> None:
    assert httpx.get(srv.url + "/health").status_code == 200


@pytest.mark.parametrize("token", TOKENS)
def test_each_configured_token_works(srv: LiveServer, token: str) -> None:
    r = httpx.post(srv.run_url(), json={"prompt": "hi", "max_tokens": 2}, headers=bearer(token))
    assert r.status_code == 200 and r.json()["success"] is True
    r = httpx.get(srv.url + "/client/v4/accounts/a/ai/models/search", headers={"authorization": f"bearer {token}"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer("first-secre"),
        bearer("first-secret-and-more"),
        {"Authorization": "Bearer"},
        {"Authorization": "first-secret"},
        {"Authorization": "Basic Zmlyc3Qtc2VjcmV0"},
        {"Authorization": "Token first-secret"},
        {"X-Api-Key": "first-secret"},
        {"Cookie": "token=first-secret"},
    ],
)
def test_missing_or_wrong_tokens_are_refused(srv: LiveServer, headers: dict[str, str]) -> None:
    assert_refused(httpx.post(srv.run_url(), json={"prompt": "hi", "max_tokens": 2}, headers=headers))


@pytest.mark.parametrize(
    "path",
    [
        "/client/v4/accounts/a/ai/models/search",
        "/client/v4/accounts/a/ai/models/schema?model=@hf/test/tiny-mistral",
        "/v1/models",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/",
        "/nope",  # unknown routes too: nothing tells an anonymous client what exists
        "/%68ealth",  # an encoded spelling of /health is not /health
        "/health/",
        "//health",
        "/health?x=1/../..",
    ],
)
def test_every_other_route_needs_the_token(srv: LiveServer, path: str) -> None:
    if path == "/health?x=1/../..":  # the query string does not change the path
        assert httpx.get(srv.url + path).status_code == 200
        return
    assert_refused(httpx.get(srv.url + path))


@pytest.mark.parametrize("param", ["token", "api_token", "access_token", "key"])
def test_a_token_in_the_query_string_is_refused(srv: LiveServer, param: str) -> None:
    r = httpx.post(srv.run_url() + f"?{param}=first-secret", json={"prompt": "hi", "max_tokens": 2})
    assert_refused(r)


def test_openai_sdk_sends_its_key_as_bearer(srv: LiveServer) -> None:
    ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="second-secret", max_retries=0)
    assert [m.id for m in ok.models.list()] == ["@hf/test/tiny-mistral"]
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert without_request_id(err.value.response) == UNAUTHORIZED


def test_cloudflare_sdk_with_token(srv: LiveServer) -> None:
    cloudflare = pytest.importorskip("cloudflare")
    ok = cloudflare.Cloudflare(api_token="first-secret", base_url=srv.url + "/client/v4", max_retries=0)
    assert ok.ai.run("@hf/test/tiny-mistral", account_id="a", prompt="hi", max_tokens=2)["usage"]["completion_tokens"]
    bad = cloudflare.Cloudflare(api_token="nope", base_url=srv.url + "/client/v4", max_retries=0)
    with pytest.raises(cloudflare.AuthenticationError):
        bad.ai.run("@hf/test/tiny-mistral", account_id="a", prompt="hi", max_tokens=2)
