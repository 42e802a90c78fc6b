"""The OpenAI-compatible API, driven by the official `openai` SDK against a real server on the demo model.

References: transformers' tokenizer of the same GGUF for token counts, the Workers AI route of the same server for
the greedy text (both must agree), and hand-derived expectations for ``stop`` and ``max_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures_text import demo_gguf_path
from tests.http_fixtures import LiveServer, live_server, without_request_id

pytestmark = pytest.mark.slow

NAME = "@hf/huggingfacetb/smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    with live_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    from transformers import AutoTokenizer

    gguf = demo_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def workers_ai(srv: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(srv.run_url(), json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]


def test_chat_completion_matches_the_workers_ai_route(srv: LiveServer, client: openai.OpenAI, hf_tok: Any) -> None:
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=16)
    assert out.object == "chat.completion" and out.id.startswith("id-") and out.id[3:].isdigit()
    assert out.model == NAME and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    expected = workers_ai(srv, {"messages": MESSAGES, "temperature": 0, "max_tokens": 16})
    assert choice.message.content == expected["response"]
    n_prompt = len(hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        n_prompt, expected["usage"]["completion_tokens"])
    assert out.usage.total_tokens == n_prompt + out.usage.completion_tokens


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump() | {
        "completion_tokens_details": None, "prompt_tokens_details": None}
    # without include_usage, no usage chunk
    plain = list(client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=4,
                                                stream=True))
    assert all(c.choices for c in plain) and all(getattr(c, "usage", None) is None for c in plain)


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Count to 100."}],
                                             temperature=0, extra_body={"ignore_eos": True}, **kw)
        assert out.usage is not None and out.usage.completion_tokens == 5
        assert out.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a sentence about the sea."}]
    full = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=30)
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[2]
    expected = text[: text.index(stop)]
    for form in (stop, [stop, "zzzz-never"]):
        out = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=30, stop=form)
        assert out.choices[0].message.content == expected
        assert out.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeat(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=NAME, messages=[{"role": "user", "content": "Invent a name."}], temperature=1.0,
                              top_p=0.95, max_tokens=12, seed=42, frequency_penalty=0.3, presence_penalty=0.2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_text_completion_is_the_raw_prompt(srv: LiveServer, client: openai.OpenAI, hf_tok: Any) -> None:
    prompt = "The three primary colours are"
    out = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("stop", "length")
    expected = workers_ai(srv, {"prompt": prompt, "raw": True, "temperature": 0, "max_tokens": 12})
    assert out.choices[0].text == expected["response"]
    assert out.usage is not None and out.usage.prompt_tokens == len(hf_tok(prompt)["input_ids"])
    streamed = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected["response"]
    # token ids work as a prompt too
    ids = hf_tok(prompt)["input_ids"]
    by_ids = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == expected["response"]


def test_model_aliases_and_the_account_route(srv: LiveServer) -> None:
    for model in (NAME, "SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct", "demo"):
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        out = c.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=2)
        assert out.model == NAME
    c = openai.OpenAI(base_url=srv.url + "/client/v4/accounts/local/ai/v1", api_key="unused", max_retries=0)
    out = c.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=8)
    direct = openai.OpenAI(base_url=srv.url + "/v1", api_key="x").chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=0, max_tokens=8)
    assert out.choices[0].message.content == direct.choices[0].message.content


def envelope_error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = without_request_id(exc.response)
    assert body["success"] is False and body["result"] is None and len(body["errors"]) == 1
    return body["errors"][0]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"n": 2}, "'n'"),
        ({"logprobs": True}, "'logprobs'"),
        ({"top_logprobs": 3, "logprobs": True}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "'logit_bias'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "'tools'"),
        ({"response_format": {"type": "json_object"}}, "'response_format'"),
        ({"extra_body": {"best_of": 3}}, "'best_of'"),
        ({"extra_body": {"mirostat": 2}}, "/mirostat"),
        ({"temperature": -1}, "/temperature"),
        ({"top_p": 0}, "/top_p"),
        ({"max_tokens": 0}, "/max_tokens"),
        ({"presence_penalty": 2.5}, "/presence_penalty"),
        ({"seed": -1}, "/seed"),
        ({"stop": [""]}, "'stop'"),
        ({"extra_body": {"temperature": "0.5"}}, "/temperature"),
        ({"extra_body": {"stream": 1}}, "/stream"),
        ({"extra_body": {"max_tokens": 4.0}}, "/max_tokens"),
    ],
)
def test_unsupported_or_invalid_parameters_are_refused(client: openai.OpenAI, kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=kw.pop("max_tokens", 4), **kw)
    e = envelope_error(err.value)
    assert e["code"] == 5006 and e["message"].startswith("AiError: Bad input: ") and needle in e["message"], e


def test_completions_refuse_echo_suffix_and_several_prompts(client: openai.OpenAI) -> None:
    for kw in ({"echo": True}, {"suffix": "end"}, {"best_of": 2}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=NAME, prompt="Hi", max_tokens=2, **kw)
        assert envelope_error(err.value)["code"] == 5006
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=["a", "b"], max_tokens=2)
    assert "several prompts" in envelope_error(err.value)["message"]


def test_errors_use_the_envelope(srv: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert envelope_error(err.value) == {"code": 5007, "message": "No such model gpt-4o or task"}
    with pytest.raises(openai.APIStatusError) as err2:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10**6)
    assert err2.value.status_code == 413 and envelope_error(err2.value)["code"] == 5021
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[])
    assert envelope_error(err.value)["code"] == 5006
    for raw, ctype in [(b"{", "application/json"), (b"[]", "application/json"), (b"x", "text/plain"),
                       (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "application/json")]:
        r = httpx.post(srv.url + "/v1/chat/completions", content=raw, headers={"content-type": ctype})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006, (raw, r.text)


WEIRD: list[Any] = [None, True, 0, -1, 1.5, 1e308, 2**64, "", "x", [], {}, [1], {"a": 1}, "\u0000"]
FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "logprobs", "frequency_penalty", "presence_penalty", "user", "tools",
          "response_format"]


def test_no_odd_value_gives_a_500(srv: LiveServer) -> None:
    with httpx.Client(timeout=60) as c:
        for field in FIELDS:
            for value in WEIRD:
                body: dict[str, Any] = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                                        "max_tokens": 2, "temperature": 0, field: value}
                r = c.post(srv.url + "/v1/chat/completions", content=json.dumps(body))
                assert r.status_code < 500, (field, value, r.text)
                if r.status_code != 200:
                    assert r.json()["success"] is False
