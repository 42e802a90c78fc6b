"""The fine-tune registry in the data directory: records, assets, lookups, and that nothing a request names can reach
outside ``<data_dir>/finetunes`` or leave a partial file behind."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from airun.errors import FinetuneMissingFilesError, FinetuneNotFoundError, InvalidAdapterError, InvalidRequestError
from airun.lora import AdapterResolver, FinetuneRegistry, default_data_dir
from airun.model.config import ModelConfig
from tests.lora_fixtures import make_peft_adapter

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MODEL = "@cf/mistral/mistral-7b-instruct-v0.2-lora"


@pytest.fixture(scope="module")
def adapter(tiny_mistral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(tiny_mistral_dir, tmp_path_factory.mktemp("reg") / "a", seed=3, r=4,
                             target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def model_cfg(tiny_mistral_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf_dict(json.loads((tiny_mistral_dir / "config.json").read_text()))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".lock")


def test_create_list_get_and_persist(tmp_path: Path) -> None:
    reg = FinetuneRegistry(tmp_path)
    a = reg.create(MODEL, "first", "my first fine-tune", public=False)
    b = reg.create(MODEL, "second.v2_x-y")
    assert UUID.fullmatch(a.id) and a.id != b.id
    assert a.created_at == a.modified_at and a.created_at.endswith("Z")
    meta = json.loads((tmp_path / "finetunes" / a.id / "meta.json").read_text())
    assert meta == {"id": a.id, "name": "first", "model": MODEL, "description": "my first fine-tune",
                    "public": False, "created_at": a.created_at, "modified_at": a.modified_at}
    again = FinetuneRegistry(tmp_path)  # a new process sees the same records
    assert [f.name for f in again.list()] == ["first", "second.v2_x-y"]
    assert again.get("first") == a and again.get(a.id) == a and again.get(b.id) == b
    with pytest.raises(FinetuneNotFoundError, match="Finetune third not found"):
        again.get("third")
    with pytest.raises(InvalidRequestError, match="already exists"):
        again.create(MODEL, "first")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", "/abs", "..", "a..b", ".hidden", "x" * 129, "sp ace", 7])
def test_bad_names_are_refused_and_create_nothing(tmp_path: Path, name: object) -> None:
    reg = FinetuneRegistry(tmp_path)
    with pytest.raises(InvalidRequestError, match="invalid fine-tune name"):
        reg.create(MODEL, name)  # type: ignore[arg-type]
    assert files_under(tmp_path) == ["finetunes"] or files_under(tmp_path) == []


def test_assets_validate_and_replace(tmp_path: Path, adapter: Path, model_cfg: ModelConfig) -> None:
    reg = FinetuneRegistry(tmp_path)
    ft = reg.create(MODEL, "ft")
    with pytest.raises(FinetuneMissingFilesError):
        reg.adapter_dir("ft")
    reg.put_asset(ft.id, "adapter_config.json", (adapter / "adapter_config.json").read_bytes(), model_cfg)
    with pytest.raises(FinetuneMissingFilesError, match="missing required files"):
        reg.adapter_dir(ft.id)
    with open(adapter / "adapter_model.safetensors", "rb") as f:  # a stream, as a multipart upload gives
        updated = reg.put_asset(ft.id, "adapter_model.safetensors", f, model_cfg)
    assert updated.modified_at >= ft.modified_at
    d = reg.adapter_dir("ft")
    assert d == tmp_path / "finetunes" / ft.id
    assert files_under(d) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (d / f).read_bytes() == (adapter / f).read_bytes()


BAD_UPLOADS = {
    "traversal name": ("../meta.json", b"{}", InvalidRequestError, "file_name must be"),
    "absolute name": ("/etc/passwd", b"x", InvalidRequestError, "file_name must be"),
    "other name": ("adapter_model.bin", b"x", InvalidRequestError, "file_name must be"),
    "bad json": ("adapter_config.json", b"{nope", InvalidAdapterError, "not valid JSON"),
    "dora config": ("adapter_config.json",
                    json.dumps({"r": 4, "target_modules": ["q_proj"], "use_dora": True}).encode(),
                    InvalidAdapterError, "use_dora"),
    "rank above cap": ("adapter_config.json", json.dumps({"r": 64, "target_modules": ["q_proj"]}).encode(),
                       InvalidAdapterError, "maximum rank"),
    "not safetensors": ("adapter_model.safetensors", b"\x00" * 64, InvalidAdapterError, "safetensors"),
    "pickle": ("adapter_model.safetensors", b"\x80\x04\x95" + b"\x00" * 40, InvalidAdapterError, "safetensors"),
    "config too big": ("adapter_config.json", b" " * ((1 << 20) + 1), InvalidAdapterError, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_leave_nothing_behind(tmp_path: Path, case: str) -> None:
    reg = FinetuneRegistry(tmp_path)
    ft = reg.create(MODEL, "ft")
    before = files_under(tmp_path)
    file_name, data, exc, message = BAD_UPLOADS[case]
    with pytest.raises(exc, match=message):
        reg.put_asset(ft.id, file_name, io.BytesIO(data))
    assert files_under(tmp_path) == before
    assert not (tmp_path / "etc").exists() and not (tmp_path / "meta.json").exists()


def test_pair_checked_against_the_model(tmp_path: Path, adapter: Path, model_cfg: ModelConfig) -> None:
    reg = FinetuneRegistry(tmp_path)
    ft = reg.create(MODEL, "ft")
    reg.put_asset(ft.id, "adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes(), model_cfg)
    before = files_under(tmp_path)
    wrong = json.loads((adapter / "adapter_config.json").read_text())
    wrong["target_modules"] = ["q_proj", "k_proj", "v_proj"]  # k_proj tensors are not in the file
    with pytest.raises(InvalidAdapterError, match="lacks"):
        reg.put_asset(ft.id, "adapter_config.json", json.dumps(wrong).encode(), model_cfg)
    assert files_under(tmp_path) == before
    small = FinetuneRegistry(tmp_path, max_bytes=100)
    with pytest.raises(InvalidAdapterError, match="limit"):
        small.put_asset(ft.id, "adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes())
    assert files_under(tmp_path) == before


BAD_IDS = ["../finetunes", "..", "/tmp", "x/../../y", "0" * 36, "A" * 8 + "-0000-0000-0000-" + "0" * 12]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_ids_never_leave_the_registry(tmp_path: Path, bad_id: str) -> None:
    reg = FinetuneRegistry(tmp_path)
    reg.create(MODEL, "ft")
    with pytest.raises(FinetuneNotFoundError):
        reg.put_asset(bad_id, "adapter_config.json", b"{}")
    with pytest.raises(FinetuneNotFoundError):
        reg.adapter_dir(bad_id)


def test_symlinked_fine_tune_folder_is_not_followed(tmp_path: Path, adapter: Path) -> None:
    reg = FinetuneRegistry(tmp_path / "data")
    real = reg.create(MODEL, "real")
    outside = tmp_path / "outside"
    shutil.copytree(tmp_path / "data" / "finetunes" / real.id, outside)
    fake_id = "12345678-1234-4234-8234-123456789abc"
    meta = json.loads((outside / "meta.json").read_text())
    (outside / "meta.json").write_text(json.dumps({**meta, "id": fake_id, "name": "fake"}))
    os.symlink(outside, tmp_path / "data" / "finetunes" / fake_id)
    with pytest.raises(FinetuneNotFoundError):
        reg.get(fake_id)
    with pytest.raises(FinetuneNotFoundError):
        reg.get("fake")
    with pytest.raises(FinetuneNotFoundError):
        reg.put_asset(fake_id, "adapter_config.json", (adapter / "adapter_config.json").read_bytes())
    assert sorted(p.name for p in outside.iterdir()) == ["meta.json"]


def test_resolver_keys(tmp_path: Path, adapter: Path) -> None:
    reg = FinetuneRegistry(tmp_path / "data")
    ft = reg.create(MODEL, "ft")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        reg.put_asset(ft.id, f, (adapter / f).read_bytes())
    res = AdapterResolver({"local": adapter}, reg)
    k_name, p_name = res.resolve("ft")
    k_id, p_id = res.resolve(ft.id)
    assert k_name == k_id and k_name.startswith(ft.id + "@") and p_name == p_id
    k_local, p_local = res.resolve("local")
    assert k_local.startswith("local@") and p_local == adapter
    reg.put_asset(ft.id, "adapter_config.json", (adapter / "adapter_config.json").read_bytes())
    assert res.resolve("ft")[0] != k_name  # replaced content, new key
    with pytest.raises(FinetuneNotFoundError):
        res.resolve("unknown")
    with pytest.raises(FinetuneNotFoundError):
        AdapterResolver({}, None).resolve("ft")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRUN_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("AIRUN_DATA_DIR")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".local" / "share" / "airun"
