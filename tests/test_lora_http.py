"""Fine-tunes over HTTP on a real server (tiny random Mistral, Mistral's real tokenizer): create, multipart uploads,
then the adapter used by name and by id on prompt and messages inputs and through the OpenAI routes, against peft's
greedy output; every refused upload gives its code and status and leaves nothing on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airun.server.settings import ServerSettings
from tests.fixtures_text import mistral_spm_model_path
from tests.http_fixtures import LiveServer, live_server, small_engine_args, strip_request_id
from tests.lora_fixtures import hf_greedy, load_peft_model, make_peft_adapter

pytestmark = pytest.mark.slow

NAME = "@hf/mistral/mistral-7b-instruct-v0.2"
FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def adapters(tiny_mistral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.fixtures_models import make_tiny_mistral

    root = tmp_path_factory.mktemp("http-adapters")
    wide = make_tiny_mistral(root / "wide-model", hidden=32, heads=4, intermediate=64, vocab_size=1000)
    return {
        "good": make_peft_adapter(tiny_mistral_dir, root / "good", seed=21, r=8, lora_alpha=32),
        "other-model": make_peft_adapter(wide, root / "other-model", seed=22, r=8),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("airun-data")


@pytest.fixture(scope="module")
def srv(tiny_mistral_dir: Path, data_dir: Path) -> Iterator[LiveServer]:
    args = small_engine_args(tiny_mistral_dir, max_model_len=512, enable_lora=True, max_loras=2, data_dir=str(data_dir))
    with live_server(args, ServerSettings(served_model_name=NAME, enable_lora=True)) as s:
        yield s


def api(srv: LiveServer, path: str = "") -> str:
    return f"{srv.url}/client/v4/accounts/local/ai/finetunes{path}"


def create(srv: LiveServer, name: str) -> dict[str, Any]:
    r = httpx.post(api(srv), json={"model": "@cf/mistral/mistral-7b-instruct-v0.2-lora", "name": name,
                                   "description": "test", "public": False}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def upload(srv: LiveServer, ft_id: str, file_name: str, data: bytes) -> httpx.Response:
    return httpx.post(api(srv, f"/{ft_id}/finetune-assets"), data={"file_name": file_name},
                      files={"file": (file_name, data, "application/octet-stream")}, timeout=60)


def error(r: httpx.Response, status: int, code: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["success"] is False and body["result"] is None and body["errors"][0]["code"] == code, body
    return strip_request_id(body["errors"][0]["message"], r.headers["x-request-id"])


def run(srv: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.run_url(), json={"max_tokens": 10, "temperature": 0, **body}, timeout=60)


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != ".lock")


@pytest.fixture(scope="module")
def expected(tiny_mistral_dir: Path, adapters: dict[str, Path]) -> dict[str, tuple[str, int]]:
    """peft's greedy answer (text, completion tokens) to PROMPT as one user turn, with the adapter and without;
    prompt ids from mistral-common, text from SentencePiece."""
    import sentencepiece
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import MistralForCausalLM

    ids = MistralTokenizer.from_file(str(mistral_spm_model_path())).encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=PROMPT)])).tokens
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_spm_model_path()))
    out = {}
    models = {"lora": load_peft_model(tiny_mistral_dir, adapters["good"]),
              "base": MistralForCausalLM.from_pretrained(tiny_mistral_dir, torch_dtype="float32").eval()}
    for key, model in models.items():
        toks = hf_greedy(model, ids, 10)
        if 2 in toks:
            toks = toks[: toks.index(2) + 1]
        out[key] = (sp.decode([t for t in toks if t != 2]), len(toks))
    assert out["lora"] != out["base"]
    return out


def test_create_upload_list_and_use_by_name_and_id(srv: LiveServer, adapters: dict[str, Path], data_dir: Path,
                                                   expected: dict[str, tuple[str, int]]) -> None:
    ft = create(srv, "sea-tune")
    assert set(ft) == {"id", "name", "model", "description", "public", "created_at", "modified_at"}
    r = run(srv, {"prompt": PROMPT, "lora": "sea-tune"})
    assert error(r, 400, 3039) == ("Finetune is missing required files "
                                   "(adapter_model.safetensors and adapter_config.json)")
    for f in FILES:
        r = upload(srv, ft["id"], f, (adapters["good"] / f).read_bytes())
        assert r.status_code == 200 and r.json() == {"result": {"success": True}, "success": True, "errors": [],
                                                     "messages": []}, r.text
    for f in FILES:
        assert (data_dir / "finetunes" / ft["id"] / f).read_bytes() == (adapters["good"] / f).read_bytes()
    listed = httpx.get(api(srv), timeout=30).json()["result"]
    assert [x["id"] for x in listed if x["name"] == "sea-tune"] == [ft["id"]]

    text, n = expected["lora"]
    for body in ({"prompt": PROMPT, "lora": "sea-tune"}, {"prompt": PROMPT, "lora": ft["id"]},
                 {"messages": [{"role": "user", "content": PROMPT}], "lora": "sea-tune"}):
        r = run(srv, body)
        assert r.status_code == 200, r.text
        assert r.json()["result"]["response"] == text and r.json()["result"]["usage"]["completion_tokens"] == n
    base = run(srv, {"prompt": PROMPT}).json()["result"]
    assert (base["response"], base["usage"]["completion_tokens"]) == expected["base"]

    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0}
    for extra in ({"model": f"{NAME}:sea-tune"}, {"model": NAME, "lora": ft["id"]}, {"lora": "sea-tune"}):
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={**chat, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == text
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={**chat, "model": f"{NAME}:sea-tune", "lora": "x"})
    assert "lora" in error(r, 400, 5006)


def test_unknown_fine_tune_3037(srv: LiveServer) -> None:
    assert error(run(srv, {"prompt": "hi", "lora": "no-such-tune"}), 404, 3037) == "Finetune no-such-tune not found"
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "model": f"{NAME}:nope"}, timeout=60)
    assert error(r, 404, 3037) == "Finetune nope not found"
    r = upload(srv, "12345678-1234-4234-8234-123456789abc", "adapter_config.json", b"{}")
    assert error(r, 404, 3037).startswith("Finetune 12345678-")


def test_refused_uploads_leave_nothing_behind(srv: LiveServer, adapters: dict[str, Path], data_dir: Path) -> None:
    ft = create(srv, "strict")
    good_cfg = json.loads((adapters["good"] / "adapter_config.json").read_text())
    cases: list[tuple[str, bytes, str]] = [
        ("../meta.json", b"{}", "file_name must be"),
        ("adapter_model.bin", b"x", "file_name must be"),
        ("adapter_config.json", b"{broken", "not valid JSON"),
        ("adapter_config.json", json.dumps({**good_cfg, "use_dora": True}).encode(), "use_dora"),
        ("adapter_config.json", json.dumps({**good_cfg, "r": 64}).encode(), "maximum rank 32"),
        ("adapter_model.safetensors", b"\x80\x04\x95pickle", "safetensors"),
    ]
    before = files_under(data_dir)
    for file_name, data, needle in cases:
        msg = error(upload(srv, ft["id"], file_name, data), 400, 5006)
        assert needle in msg, (needle, msg)
        assert files_under(data_dir) == before
    # a pair that does not fit the served model: refused when the second file arrives
    assert upload(srv, ft["id"], "adapter_config.json", (adapters["other-model"] / FILES[0]).read_bytes()).is_success
    before = files_under(data_dir)
    msg = error(upload(srv, ft["id"], FILES[1], (adapters["other-model"] / FILES[1]).read_bytes()), 400, 5006)
    assert "shape" in msg
    assert files_under(data_dir) == before
    r = httpx.post(api(srv, f"/{ft['id']}/finetune-assets"), data={"file_name": "adapter_config.json"}, timeout=30)
    assert "file" in error(r, 400, 5006)
    for bad in ({"model": "m", "name": "../evil"}, {"model": "m", "name": "strict"}, {"name": "x"}, [1]):
        error(httpx.post(api(srv), json=bad, timeout=30), 400, 5006)
    assert files_under(data_dir) == before


def test_uploads_have_their_own_size_limit(srv: LiveServer, adapters: dict[str, Path]) -> None:
    ft = create(srv, "big-upload")
    weights = (adapters["good"] / FILES[1]).read_bytes()
    saved = srv.settings.max_body_bytes, srv.settings.max_upload_bytes
    srv.settings.max_body_bytes = 1000  # far below the adapter's size
    try:
        assert len(weights) > 10 * srv.settings.max_body_bytes
        assert upload(srv, ft["id"], FILES[1], weights).status_code == 200
        assert error(run(srv, {"prompt": "x" * 2000}), 413, 3006) == "Request is too large"
        srv.settings.max_upload_bytes = len(weights) // 2
        assert error(upload(srv, ft["id"], FILES[1], weights), 413, 3006) == "Request is too large"
    finally:
        srv.settings.max_body_bytes, srv.settings.max_upload_bytes = saved

