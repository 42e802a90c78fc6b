"""The Workers AI REST API over a real uvicorn server on the demo model (SmolLM2-135M-Instruct GGUF, float32).

References come from outside airun: token counts from transformers' own tokenizer and chat template of the same GGUF,
the response shapes and catalog values from the Workers AI API reference, and the official `cloudflare` SDK as a
client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from airun.server.sse import PADDING_ALPHABET
from tests.fixtures_text import demo_gguf_path
from tests.http_fixtures import LiveServer, live_server, without_request_id

pytestmark = pytest.mark.slow

NAME = "@hf/huggingfacetb/smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    with live_server() as s:
        yield s


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    from transformers import AutoTokenizer

    gguf = demo_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def hf_chat_len(tok: Any, messages: list[dict[str, str]]) -> int:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def post(srv: LiveServer, body: dict[str, Any], url: str | None = None, **kw: Any) -> httpx.Response:
    return httpx.post(url or srv.run_url(), json=body, timeout=120, **kw)


def sse_events(text: str) -> list[str]:
    """The data payloads of an event stream, in order."""
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def streamed(srv: LiveServer, body: dict[str, Any], url: str | None = None) -> tuple[str, dict[str, int]]:
    """Runs ``body`` streamed; checks every frame's shape and returns the concatenated text and the usage."""
    r = post(srv, {**body, "stream": True}, url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    frames = [json.loads(e) for e in events[:-1]]
    *pieces, last = frames
    for f in pieces:
        assert set(f) == {"response", "p"} and isinstance(f["response"], str) and f["response"]
        assert f["p"] and PADDING_ALPHABET.startswith(f["p"])
    assert set(last) == {"response", "usage"} and last["response"] == ""
    return "".join(f["response"] for f in pieces), last["usage"]


def result(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"result", "success", "errors", "messages"}
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    res = body["result"]
    assert set(res) == {"response", "usage"}
    use = res["usage"]
    assert set(use) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]
    return res


# ---------------------------------------------------------------- health, name, request id

def test_health_names_the_served_model(srv: LiveServer) -> None:
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": NAME}
    assert srv.model == NAME


def test_every_response_has_a_request_id(srv: LiveServer) -> None:
    ids = {httpx.get(srv.url + "/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


# ---------------------------------------------------------------- input shapes and usage

def test_prompt_is_a_user_turn_of_the_chat_template(srv: LiveServer, hf_tok: Any) -> None:
    res = result(post(srv, {"prompt": QUESTION, "temperature": 0, "max_tokens": 16}))
    assert res["usage"]["prompt_tokens"] == hf_chat_len(hf_tok, [{"role": "user", "content": QUESTION}])
    assert 1 <= res["usage"]["completion_tokens"] <= 16
    assert res["response"].strip()


@pytest.mark.parametrize("raw", [True, "true"])
def test_raw_prompt_goes_to_the_tokenizer_verbatim(srv: LiveServer, hf_tok: Any, raw: Any) -> None:
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    res = result(post(srv, {"prompt": prompt, "raw": raw, "temperature": 0, "max_tokens": 8}))
    assert res["usage"]["prompt_tokens"] == len(hf_tok(prompt)["input_ids"])


def test_messages_with_system_and_history(srv: LiveServer, hf_tok: Any) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain? Ünïcödé ✓"},
    ]
    res = result(post(srv, {"messages": messages, "temperature": 0, "max_tokens": 8}))
    assert res["usage"]["prompt_tokens"] == hf_chat_len(hf_tok, messages)


def test_content_parts_are_joined_with_a_blank_line(srv: LiveServer, hf_tok: Any) -> None:
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    res = result(post(srv, {"messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 8}))
    joined = [{"role": "user", "content": "First part.\n\nSecond part."}]
    assert res["usage"]["prompt_tokens"] == hf_chat_len(hf_tok, joined)
    same = result(post(srv, {"messages": joined, "temperature": 0, "max_tokens": 8}))
    assert same == res


INPUTS = {
    "prompt": {"prompt": QUESTION},
    "raw": {"prompt": "The three primary colours are", "raw": True},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]},
    "parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]},
}


@pytest.mark.parametrize("shape", list(INPUTS))
def test_streamed_text_equals_the_non_streamed_text(srv: LiveServer, shape: str) -> None:
    body = {**INPUTS[shape], "temperature": 0, "max_tokens": 20}
    res = result(post(srv, body))
    text, use = streamed(srv, body)
    assert text == res["response"]
    assert use == res["usage"]


def test_ignore_eos_generates_exactly_max_tokens(srv: LiveServer) -> None:
    body = {"prompt": "Count: 1, 2, 3,", "raw": True, "temperature": 0, "max_tokens": 9, "ignore_eos": True}
    assert result(post(srv, body))["usage"]["completion_tokens"] == 9
    assert streamed(srv, body)[1]["completion_tokens"] == 9


def test_sampling_parameters_are_accepted_and_seeded_runs_repeat(srv: LiveServer) -> None:
    body = {"prompt": "Tell me a word.", "max_tokens": 12, "temperature": 1.2, "top_p": 0.9, "top_k": 40,
            "seed": 1234, "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -0.5}
    first, second = result(post(srv, body)), result(post(srv, body))
    assert first == second


def test_defaults_are_those_of_the_schema(srv: LiveServer) -> None:
    # max_tokens defaults to 256: with ignore_eos the answer is exactly that long.
    res = result(post(srv, {"prompt": "Hi", "raw": True, "ignore_eos": True, "temperature": 0}))
    assert res["usage"]["completion_tokens"] == 256


# ---------------------------------------------------------------- model spellings and routes

def test_model_spellings_and_the_short_route(srv: LiveServer) -> None:
    body = {"prompt": QUESTION, "temperature": 0, "max_tokens": 10}
    expected = result(post(srv, body))
    encoded = srv.url + "/client/v4/accounts/abc123/ai/run/@hf%2Fhuggingfacetb%2Fsmollm2-135m-instruct"
    assert result(post(srv, body, encoded)) == expected
    assert result(post(srv, body, encoded.replace("@", "%40"))) == expected
    assert result(post(srv, body, srv.url + "/ai/run/" + NAME)) == expected
    assert result(post(srv, body, srv.run_url() + "?foo=bar&stream=yes&queueRequest=true")) == expected


def test_curl_style_form_content_type_is_read_as_json(srv: LiveServer) -> None:
    body = json.dumps({"prompt": QUESTION, "temperature": 0, "max_tokens": 6})
    r = httpx.post(srv.run_url(), content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert result(r)["usage"]["completion_tokens"] <= 6


# ---------------------------------------------------------------- catalog

def test_models_search(srv: LiveServer) -> None:
    base = srv.url + "/client/v4/accounts/local/ai/models/search"
    r = httpx.get(base)
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["errors"] == [] and len(body["result"]) == 1
    entry = body["result"][0]
    assert entry["name"] == NAME and entry["task"]["name"] == "Text Generation"
    props = {p["property_id"]: p["value"] for p in entry["properties"]}
    assert props["context_window"] == "2048" and props["max_total_tokens"] == "2048"
    assert [v["title"] for v in entry["schema"]["input"]["oneOf"]] == ["Prompt", "Messages"]
    assert body["result_info"] == {"page": 1, "per_page": 20, "count": 1, "total_count": 1}
    assert httpx.get(base, params={"page": 2}).json()["result"] == []
    assert httpx.get(base, params={"search": "SmolLM2"}).json()["result"][0]["name"] == NAME
    assert httpx.get(base, params={"search": "llama-3"}).json()["result"] == []
    assert len(httpx.get(base, params={"task": "Text Generation", "author": "huggingfacetb"}).json()["result"]) == 1
    assert httpx.get(base, params={"task": "Translation"}).json()["result"] == []
    assert len(httpx.get(base, params={"unknown": "x", "hide_experimental": "true"}).json()["result"]) == 1


def test_models_schema(srv: LiveServer) -> None:
    r = httpx.get(srv.url + "/client/v4/accounts/local/ai/models/schema", params={"model": NAME})
    assert r.status_code == 200
    res = r.json()["result"]
    assert set(res) == {"input", "output"}
    assert res["input"]["oneOf"][0]["required"] == ["prompt"]
    assert res["input"]["oneOf"][0]["properties"]["max_tokens"]["default"] == 256
    assert res["input"]["oneOf"][0]["properties"]["temperature"] == {
        "type": "number", "default": 0.6, "minimum": 0, "maximum": 5,
        "description": "Controls the randomness of the output; higher values produce more random results.",
    }
    assert res["output"]["oneOf"][0]["required"] == ["response"]


def test_openapi_document_describes_the_run_route(srv: LiveServer) -> None:
    doc = httpx.get(srv.url + "/openapi.json").json()
    run = doc["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]
    schema = run["requestBody"]["content"]["application/json"]["schema"]
    assert [v["title"] for v in schema["oneOf"]] == ["Prompt", "Messages"]
    assert {"200", "400", "401", "404", "413", "500"} <= set(run["responses"]) and "422" not in run["responses"]
    model_param = next(p for p in run["parameters"] if p["name"] == "model")
    assert model_param["schema"]["enum"] == [NAME]
    assert schema["oneOf"][0]["properties"]["max_tokens"]["maximum"] == 2047
    assert run["responses"]["200"]["content"]["text/event-stream"]["schema"]["required"] == ["data"]
    assert "/v1/chat/completions" in doc["paths"] and "/v1/completions" in doc["paths"]


def test_metrics(srv: LiveServer) -> None:
    text = httpx.get(srv.url + "/metrics").text
    assert re.search(r"^airun_num_requests_running 0\.0$", text, re.M)
    assert re.search(r"^airun_kv_blocks_total [1-9]", text, re.M)


# ---------------------------------------------------------------- the official SDK

def test_cloudflare_sdk(srv: LiveServer) -> None:
    cloudflare = pytest.importorskip("cloudflare")
    client = cloudflare.Cloudflare(api_token="unused", base_url=srv.url + "/client/v4", max_retries=0)
    expected = result(post(srv, {"prompt": QUESTION, "temperature": 0, "max_tokens": 12}))
    got = client.ai.run(NAME, account_id="acc", prompt=QUESTION, temperature=0, max_tokens=12)
    assert got == expected
    got = client.ai.run(NAME, account_id="acc", messages=[{"role": "user", "content": QUESTION}], temperature=0,
                        max_tokens=12)
    assert got == expected
    with client.ai.with_streaming_response.run(NAME, account_id="acc", prompt=QUESTION, temperature=0, max_tokens=12,
                                               stream=True) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(ln[6:])["response"] for ln in lines[:-1]) == expected["response"]
    models = list(client.ai.models.list(account_id="acc"))  # pages until an empty page
    assert [m["name"] for m in models] == [NAME]
    schema = client.ai.models.schema.get(account_id="acc", model=NAME)
    assert schema.to_dict()["input"]["oneOf"][0]["required"] == ["prompt"]
    with pytest.raises(cloudflare.BadRequestError) as err:
        client.ai.run("@hf/nobody/nothing", account_id="acc", prompt="x")
    assert err.value.status_code == 400
    assert without_request_id(err.value.response)["errors"] == [
        {"code": 5007, "message": "No such model @hf/nobody/nothing or task"}]
