"""``airun finetune create MODEL NAME FOLDER`` / ``finetune list`` and the LoRA engine flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from airun.cli import build_parser, engine_args_from, main
from airun.lora import FinetuneRegistry
from tests.lora_fixtures import make_peft_adapter

MODEL = "@cf/mistral/mistral-7b-instruct-v0.2-lora"


@pytest.fixture(scope="module")
def adapter(tiny_mistral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(tiny_mistral_dir, tmp_path_factory.mktemp("cli") / "a", seed=9, r=4,
                             target_modules=["q_proj", "v_proj"])


def test_finetune_create_then_list(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["finetune", "create", MODEL, "cli-tune", str(adapter), "--data-dir", str(data),
                 "--description", "from the CLI"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "cli-tune" and record["model"] == MODEL and record["description"] == "from the CLI"
    reg = FinetuneRegistry(data)
    d = reg.adapter_dir("cli-tune")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (d / f).read_bytes() == (adapter / f).read_bytes()
    assert main(["finetune", "list", "--data-dir", str(data)]) == 0
    assert [f["id"] for f in json.loads(capsys.readouterr().out)] == [record["id"]]
    assert main(["finetune", "create", MODEL, "cli-tune", str(adapter), "--data-dir", str(data)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_finetune_create_refuses_a_bad_folder_and_creates_nothing(adapter: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    bad = Path(shutil.copytree(adapter, tmp_path / "bad"))
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert main(["finetune", "create", MODEL, "bad", str(bad), "--data-dir", str(data)]) == 2
    assert "use_dora" in capsys.readouterr().err
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").unlink()
    assert main(["finetune", "create", MODEL, "bad", str(bad), "--data-dir", str(data)]) == 2
    assert "missing required files" in capsys.readouterr().err
    assert FinetuneRegistry(data).list() == []


def test_lora_engine_flags() -> None:
    parser = build_parser()
    ns = parser.parse_args(["generate", "--lora", "a=/x/a", "--lora", "b=/y=z", "--max-loras", "3",
                            "--max-lora-rank", "16", "--data-dir", "/d", "hi"])
    args = engine_args_from(ns)
    assert args.enable_lora and args.lora_modules == {"a": "/x/a", "b": "/y=z"}
    assert (args.max_loras, args.max_lora_rank, args.data_dir) == (3, 16, "/d")
    plain = engine_args_from(parser.parse_args(["generate", "hi"]))
    assert not plain.enable_lora and plain.lora_modules == {} and plain.max_loras == 8 and plain.max_lora_rank == 32
    assert engine_args_from(parser.parse_args(["generate", "--enable-lora", "hi"])).enable_lora
    from airun.errors import InvalidRequestError

    for bad in (["--lora", "noequals"], ["--lora", "=p"], ["--lora", "a=1", "--lora", "a=2"]):
        with pytest.raises(InvalidRequestError, match="--lora"):
            engine_args_from(parser.parse_args(["generate", *bad, "hi"]))


def test_serve_flags_turn_lora_on_in_the_server_settings() -> None:
    from airun.server.serve import settings_from

    parser = build_parser()
    assert settings_from(parser.parse_args(["serve", "--lora", "a=/x"]), ()).enable_lora
    assert settings_from(parser.parse_args(["serve", "--enable-lora"]), ()).enable_lora
    assert not settings_from(parser.parse_args(["serve"]), ()).enable_lora
