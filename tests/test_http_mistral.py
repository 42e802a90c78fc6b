"""The Workers AI route on a tiny random Mistral with Mistral-7B-Instruct-v0.2's real tokenizer, served under the
published name: the prompt token ids airun builds equal mistral-common's encoding (the reference implementation of
Mistral's instruct format), roles out of order are a 3010, and the catalog entry is the published one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airun.server.inputs import chat_prompt_ids
from tests.fixtures_text import mistral_spm_model_path
from tests.http_fixtures import LiveServer, live_server, small_engine_args

pytestmark = pytest.mark.slow

NAME = "@hf/mistral/mistral-7b-instruct-v0.2"

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
    "multi-turn": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "system multi-turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
    ],
    "unicode": [{"role": "user", "content": "Grüße aus Zürich 😀 — 你好，世界 ¿qué tal? naïve café\tend"}],
    "content parts": [
        {"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}]}
    ],
}


def mistral_common_ids(messages: list[dict[str, Any]]) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, TextChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [TextChunk(text=p["text"]) for p in content]
        out.append(kinds[m["role"]](content=content))
    tok = MistralTokenizer.from_file(str(mistral_spm_model_path()))
    return tok.encode_chat_completion(ChatCompletionRequest(messages=out)).tokens


@pytest.fixture(scope="module")
def srv(tiny_mistral_dir: Path) -> Iterator[LiveServer]:
    from airun.server.settings import ServerSettings

    with live_server(small_engine_args(tiny_mistral_dir, max_model_len=1024),
                     ServerSettings(served_model_name=NAME)) as s:
        yield s


def run(srv: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.run_url(), json=body, timeout=60)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_ids_equal_mistral_common(srv: LiveServer, name: str) -> None:
    messages = CONVERSATIONS[name]
    expected = mistral_common_ids(messages)
    r = run(srv, {"messages": messages, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["usage"]["prompt_tokens"] == len(expected)
    # the helper the route uses, checked id by id (content parts are joined as the route joins them)
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "\n\n".join(p["text"] for p in m["content"])} for m in messages]
    assert chat_prompt_ids(srv.engine.tokenizer, flat) == expected


def test_prompt_is_one_user_turn(srv: LiveServer) -> None:
    r = run(srv, {"prompt": "Tell me a joke.", "max_tokens": 2})
    assert r.status_code == 200
    expected = mistral_common_ids([{"role": "user", "content": "Tell me a joke."}])
    assert r.json()["result"]["usage"]["prompt_tokens"] == len(expected)


def test_raw_prompt_is_sentencepiece_with_bos(srv: LiveServer) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_spm_model_path()))
    prompt = "[INST] Tell me a joke. [/INST] Why"
    r = run(srv, {"prompt": prompt, "raw": True, "max_tokens": 2})
    assert r.status_code == 200
    assert r.json()["result"]["usage"]["prompt_tokens"] == 1 + len(sp.encode(prompt))


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "I speak first."}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
    ],
)
def test_roles_out_of_order_3010(srv: LiveServer, messages: list[dict[str, str]]) -> None:
    r = run(srv, {"messages": messages})
    assert r.status_code == 400
    body = r.json()
    assert body["success"] is False and body["result"] is None
    assert body["errors"][0]["code"] == 3010
    assert body["errors"][0]["message"].startswith("Invalid or incomplete input for the model: ")


def test_catalog_entry_is_the_published_one(srv: LiveServer) -> None:
    r = httpx.get(srv.url + "/client/v4/accounts/local/ai/models/search")
    (entry,) = r.json()["result"]
    assert entry["id"] == "b97d7069-48d9-461c-80dd-445d20a632eb" and entry["name"] == NAME
    assert entry["created_at"] == "2024-04-02 13:00:59.244"
    props = {p["property_id"]: p["value"] for p in entry["properties"]}
    assert props["context_window"] == "1024" and props["max_total_tokens"] == "1024"
    assert props["max_input_length"] == "1023"
    assert props["info"] == "https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2"
    assert props["planned_deprecation_date"] == "2026-05-30"


def test_streamed_random_text_equals_non_streamed(srv: LiveServer) -> None:
    body = {"prompt": "Hello", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = run(srv, body).json()["result"]
    r = run(srv, {**body, "stream": True})
    import json

    frames = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert "".join(f["response"] for f in frames) == full["response"]
    assert frames[-1]["usage"] == full["usage"] and full["usage"]["completion_tokens"] == 24
