"""Hostile clients against a real server with an API token (the demo model, a temporary data directory):
authentication (missing, wrong, differently-cased tokens, tokens in the query string, encoded paths, /metrics),
path traversal through fine-tune names, ids and asset names (``..``, absolute paths, encoded slashes, symlinks),
a pickle renamed to ``.safetensors``, hostile JSON (huge numbers, deep nesting, invalid UTF-8, NUL, long strings),
and chat templates that try to escape the sandbox or run forever. Nothing may be written outside the data directory.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import airun
from airun.errors import InvalidRequestError
from airun.server.settings import ServerSettings
from airun.text.chat_template import ChatMessage, render_chat_template
from tests.http_fixtures import LiveServer, live_server, small_engine_args, without_request_id

pytestmark = pytest.mark.slow
TOKEN = "s3cret-Token-42"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    base = tmp_path_factory.mktemp("sec")
    data = base / "data"
    (base / "outside").mkdir()
    (base / "outside" / "victim.txt").write_text("untouched")
    settings = ServerSettings(api_tokens=(TOKEN,))
    with live_server(small_engine_args(data_dir=str(data)), settings) as srv:
        yield srv, base


def tree(base: Path) -> set[str]:
    """Every path under ``base`` outside the data directory, with the victim file's content."""
    out = {str(p.relative_to(base)) for p in base.rglob("*") if "data" not in p.relative_to(base).parts[:1]}
    out.add((base / "outside" / "victim.txt").read_text())
    return out


def err(r: httpx.Response) -> tuple[int, int]:
    body = r.json()
    assert body["success"] is False and body["result"] is None
    return r.status_code, body["errors"][0]["code"]


# ---------------------------------------------------------------- authentication
def test_tokens_missing_wrong_or_differently_cased(world: tuple[LiveServer, Path]) -> None:
    srv, _ = world
    payload = {"prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {TOKEN.upper()}"},
                    {"authorization": f"Bearer {TOKEN.lower()}"}, {"authorization": f"Basic {TOKEN}"},
                    {"authorization": f"Bearer {TOKEN}x"}, {"authorization": f"Bearer {TOKEN[:-1]}"}):
        r = httpx.post(srv.run_url(), json=payload, headers=headers, timeout=30)
        assert err(r) == (401, 10000), headers
        assert without_request_id(r)["errors"][0]["message"] == "Authentication error"
    assert httpx.post(srv.run_url(), json=payload, headers=AUTH, timeout=60).status_code == 200
    assert httpx.post(srv.run_url(), json=payload, headers={"authorization": f"bearer {TOKEN}"},
                      timeout=60).status_code == 200  # the scheme is case-insensitive, the token is not


def test_token_in_query_string_is_refused(world: tuple[LiveServer, Path]) -> None:
    srv, _ = world
    for query in ({"token": TOKEN}, {"api_key": TOKEN}, {"Access_Token": TOKEN}):
        r = httpx.post(srv.run_url(), params=query, json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert err(r) == (401, 10000)
        r = httpx.post(srv.run_url(), params=query, json={"prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=30)
        assert err(r) == (401, 10000)  # refused even beside a valid header: the URL leaked it


def test_every_route_but_health_needs_the_token(world: tuple[LiveServer, Path]) -> None:
    srv, _ = world
    assert httpx.get(srv.url + "/health").status_code == 200
    for path in ("/", "/app.js", "/v1/models", "/metrics", "/openapi.json", "/docs", "/%68ealth", "/health/",
                 "//health", "/client/v4/accounts/local/ai/models/search", "/client/v4/accounts/local/ai/finetunes"):
        assert err(httpx.get(srv.url + path)) == (401, 10000), path
    assert httpx.get(srv.url + "/metrics", headers=AUTH).status_code == 200
    srv.settings.public_metrics = True
    try:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert err(httpx.get(srv.url + "/v1/models")) == (401, 10000)
    finally:
        srv.settings.public_metrics = False


# ---------------------------------------------------------------- paths built from requests
def finetunes_url(srv: LiveServer) -> str:
    return srv.url + "/client/v4/accounts/local/ai/finetunes"


def create(srv: LiveServer, name: str) -> httpx.Response:
    return httpx.post(finetunes_url(srv), json={"model": srv.model, "name": name}, headers=AUTH, timeout=30)


def upload(srv: LiveServer, ft_id: str, file_name: str, content: bytes) -> httpx.Response:
    url = f"{finetunes_url(srv)}/{ft_id}/finetune-assets"
    return httpx.post(url, data={"file_name": file_name}, files={"file": ("x", content)}, headers=AUTH, timeout=30)


def test_traversal_in_names_ids_and_asset_names(world: tuple[LiveServer, Path]) -> None:
    srv, base = world
    before = tree(base)
    for name in ("../evil", "..", "/etc/passwd", str(base / "outside" / "x"), "a/b", "a\\b", "%2e%2e%2fevil",
                 "a/../../evil", ".hidden", "x" * 200, "nul\u0000name"):
        assert err(create(srv, name)) == (400, 5006), name
    ok = create(srv, "good-one")
    assert ok.status_code == 200, ok.text
    ft_id = ok.json()["result"]["id"]
    for file_name in ("../adapter_config.json", "/tmp/adapter_config.json", "adapter_config.json/../../x",
                      "..%2Fadapter_config.json", "sub/adapter_config.json", "meta.json"):
        assert err(upload(srv, ft_id, file_name, b"{}")) == (400, 5006), file_name
    for bad_id in ("..%2F..%2Foutside", "%2E%2E", ft_id + "%2F..%2F..", "..", str(base / "outside")):
        r = upload(srv, bad_id, "adapter_config.json", b"{}")
        assert r.status_code in (400, 404), (bad_id, r.status_code)
    assert tree(base) == before


def test_symlinks_do_not_lead_outside(world: tuple[LiveServer, Path]) -> None:
    srv, base = world
    before = tree(base)
    root = base / "data" / "finetunes"
    ok = create(srv, "linked")
    ft_id = ok.json()["result"]["id"]
    # an id-shaped symlink in the registry pointing outside: not a fine-tune
    fake = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    (root / fake).symlink_to(base / "outside", target_is_directory=True)
    assert err(upload(srv, fake, "adapter_config.json", b"{}")) == (404, 3037)
    # an asset that is a symlink to a file outside: an upload replaces the link, never writes through it
    victim = base / "outside" / "victim.txt"
    (root / ft_id / "adapter_config.json").symlink_to(victim)
    config = b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}'
    upload(srv, ft_id, "adapter_config.json", config)
    assert victim.read_text() == "untouched"
    (root / fake).unlink()
    assert tree(base) == before


def test_pickle_renamed_to_safetensors_is_refused(world: tuple[LiveServer, Path]) -> None:
    srv, base = world
    ft_id = create(srv, "pickled").json()["result"]["id"]
    buf = io.BytesIO()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 576)}, buf)
    r = upload(srv, ft_id, "adapter_model.safetensors", buf.getvalue())
    assert err(r) == (400, 5006)
    assert not (base / "data" / "finetunes" / ft_id / "adapter_model.safetensors").exists()


def test_no_pickle_loading_anywhere_in_the_package() -> None:
    """Model and adapter files load only as safetensors, GGUF or JSON: no module reads pickles."""
    pkg = Path(airun.__file__).parent
    pattern = re.compile(r"\btorch\.load\(|\bimport pickle\b|\bpickle\.loads?\(|\bnp\.load\(|\bjoblib\b")
    offenders = [str(p) for p in pkg.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


# ---------------------------------------------------------------- hostile JSON
def test_hostile_bodies_get_4xx(world: tuple[LiveServer, Path]) -> None:
    srv, _ = world
    headers = {**AUTH, "content-type": "application/json"}
    chat = srv.url + "/v1/chat/completions"
    cases: list[tuple[str, bytes]] = [
        (srv.run_url(), b'{"prompt": "hi", "max_tokens": 1e400}'),
        (srv.run_url(), b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"),
        (srv.run_url(), b'{"prompt": "hi", "max_tokens": 99999999999999999999}'),
        (srv.run_url(), b'{"prompt": "hi", "temperature": -1e308}'),
        (srv.run_url(), b'{"prompt": "hi", "seed": 1e30}'),
        (srv.run_url(), b"[" * 100_000 + b"]" * 100_000),
        (srv.run_url(), b'{"prompt": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}"),
        (srv.run_url(), b'{"prompt": "\xff\xfe bad utf-8"}'),
        (srv.run_url(), b'{"prompt": "nul \\u0000 inside"}'),
        (srv.run_url(), b'{"prompt": "lone \\ud800 surrogate"}'),
        (srv.run_url(), b'{"prompt": "' + b"long " * 180_000 + b'"}'),
        (srv.run_url(), b'{"prompt": "hi", "lora": "' + b"x" * 500_000 + b'"}'),
        (chat, b'{"model": "' + b"m" * 500_000 + b'", "messages": [{"role": "user", "content": "hi"}]}'),
        (chat, b'{"model": "x", "messages": [{"role": "user\\u0000", "content": "hi"}]}'),
        (chat, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}'),
        (chat, b'{"messages": [{"role": "user", "content": "hi"}], "n": 1000000000000}'),
    ]
    for url, raw in cases:
        r = httpx.post(url, content=raw, headers=headers, timeout=60)
        assert 400 <= r.status_code < 500, (raw[:80], r.status_code, r.text[:200])
        assert r.json()["success"] is False


# ---------------------------------------------------------------- chat templates
def test_chat_templates_stay_in_the_sandbox() -> None:
    msgs = [ChatMessage("user", "hi")]
    hostile = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append(1) %}{{ x }}",  # the immutable sandbox: no mutation
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% for i in range(10**9) %}{{ i }}{% endfor %}",  # caught by the guard or the time limit
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    ]
    for source in hostile:
        with pytest.raises(InvalidRequestError):
            render_chat_template(source, msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True,
                                 time_limit_s=0.5)
    assert not os.path.exists("/tmp/airun-pwned")
