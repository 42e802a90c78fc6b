"""PEFT adapter validation: a real adapter saved by peft is accepted; every unsupported or mismatched variant of it is
refused with an InvalidAdapterError naming the problem (or the 3039 missing-files error)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from airun.errors import FinetuneMissingFilesError, InvalidAdapterError
from airun.lora import load_adapter, parse_adapter_config, validate_adapter_dir
from airun.model.config import ModelConfig
from tests.lora_fixtures import make_peft_adapter

PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def model_cfg(tiny_mistral_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf_dict(json.loads((tiny_mistral_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def good(tiny_mistral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(tiny_mistral_dir, tmp_path_factory.mktemp("good") / "a", seed=5, r=8, lora_alpha=16)


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "adapter"))


def edit_config(d: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    fn(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    t = load_file(str(d / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(d / "adapter_model.safetensors"))


def test_peft_adapter_is_accepted_and_loaded(good: Path, model_cfg: ModelConfig) -> None:
    cfg = validate_adapter_dir(good, model_cfg)
    assert (cfg.r, cfg.lora_alpha, cfg.scale) == (8, 16.0, 2.0)
    ad = load_adapter(good, model_cfg, key="k")
    assert len(ad.weights) == 2 * 7 and ad.targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}
    raw = load_file(str(good / "adapter_model.safetensors"))
    a, b = ad.weights[(1, "k_proj")]
    assert torch.equal(a, raw[f"{PREFIX}.1.self_attn.k_proj.lora_A.weight"])
    assert torch.equal(b, raw[f"{PREFIX}.1.self_attn.k_proj.lora_B.weight"])
    assert a.shape == (8, 64) and b.shape == (16, 8)  # 2 KV heads x head_dim 8


def test_scales_and_target_spellings() -> None:
    base = {"peft_type": "LORA", "r": 16, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert parse_adapter_config(base).scale == 0.5
    assert parse_adapter_config({**base, "use_rslora": True}).scale == 8 / math.sqrt(16) == 2.0
    assert parse_adapter_config({**base, "lora_alpha": 32}).scale == 2.0
    every = parse_adapter_config({**base, "target_modules": "all-linear"}).targeted(2)
    assert len(every) == 14
    regex = parse_adapter_config({**base, "target_modules": r".*\.(q_proj|v_proj)"}).targeted(3)
    assert regex == {(i, t) for i in range(3) for t in ("q_proj", "v_proj")}
    some = parse_adapter_config({**base, "target_modules": ["self_attn.o_proj", "down_proj"],
                                 "layers_to_transform": [1]}).targeted(3)
    assert some == {(1, "o_proj"), (1, "down_proj")}


CONFIG_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "dora": (lambda c: c.update(use_dora=True), "use_dora"),
    "bias": (lambda c: c.update(bias="all"), "bias"),
    "lora_bias": (lambda c: c.update(lora_bias=True), "lora_bias"),
    "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
    "rank too high": (lambda c: c.update(r=64), "exceeds the maximum rank 32"),
    "rank not int": (lambda c: c.update(r="8"), "positive integer"),
    "not lora": (lambda c: c.update(peft_type="PREFIX_TUNING"), "peft_type"),
    "not causal lm": (lambda c: c.update(task_type="SEQ_CLS"), "task_type"),
    "lm_head target": (lambda c: c.update(target_modules=["q_proj", "lm_head"]), "lm_head"),
    "embedding target": (lambda c: c.update(target_modules=["embed_tokens"]), "embed_tokens"),
    "regex hits lm_head": (lambda c: c.update(target_modules=".*"), "lm_head"),
    "rank pattern": (lambda c: c.update(rank_pattern={"q_proj": 4}), "rank_pattern"),
    "fan_in_fan_out": (lambda c: c.update(fan_in_fan_out=True), "fan_in_fan_out"),
    "pissa residual base": (lambda c: c.update(init_lora_weights="pissa_niter_4"), "convert it"),
    "layers pattern": (lambda c: c.update(layers_to_transform=[0], layers_pattern="h"), "layers_pattern"),
    "layer out of range": (lambda c: c.update(layers_to_transform=[0, 5]), "exceeds the model's 2 layers"),
    "other family": (lambda c: c.update(model_type="gemma"), "model_type"),
    "r does not match tensors": (lambda c: c.update(r=4), "shape"),
    "fewer targets than tensors": (lambda c: c.update(target_modules=["q_proj", "v_proj"]), "does not target"),
    "unknown target name": (lambda c: c.update(target_modules=["q_proj", "c_attn"]), "c_attn"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_refusals(copy: Path, model_cfg: ModelConfig, case: str) -> None:
    fn, message = CONFIG_CASES[case]
    edit_config(copy, fn)
    with pytest.raises(InvalidAdapterError, match=message):
        load_adapter(copy, model_cfg, key="k")


def _drop_one(t: dict[str, torch.Tensor]) -> None:
    del t[f"{PREFIX}.1.mlp.up_proj.lora_B.weight"]


TENSOR_CASES: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "missing tensor": (_drop_one, "lacks 1 tensors"),
    "extra embedding lora": (lambda t: t.update({"base_model.model.model.embed_tokens.lora_A.weight":
                                                 torch.zeros(8, 100)}), "not a LoRA weight"),
    "dora magnitude": (lambda t: t.update({f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}),
                       "not a LoRA weight"),
    "wrong shape": (lambda t: t.update({f"{PREFIX}.0.mlp.down_proj.lora_A.weight": torch.zeros(8, 64)}),
                    r"down_proj.lora_A.weight has shape \[8, 64\]; .* need \[8, 128\]"),
    "layer beyond model": (lambda t: t.update({f"{PREFIX}.7.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)}),
                           "does not target"),
    "float64": (lambda t: t.update({k: v.double() for k, v in t.items()}), "dtype F64"),
    "nan": (lambda t: t[f"{PREFIX}.0.self_attn.v_proj.lora_B.weight"].fill_(float("nan")), "NaN"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensor_refusals(copy: Path, model_cfg: ModelConfig, case: str) -> None:
    fn, message = TENSOR_CASES[case]
    edit_tensors(copy, fn)
    with pytest.raises(InvalidAdapterError, match=message):
        load_adapter(copy, model_cfg, key="k")


def test_adapter_for_another_model_size(tiny_mistral_dir: Path, tmp_path: Path, model_cfg: ModelConfig) -> None:
    from tests.fixtures_models import make_tiny_mistral

    other = make_tiny_mistral(tmp_path / "wide", hidden=32, heads=4, intermediate=64, vocab_size=1000)
    ad = make_peft_adapter(other, tmp_path / "wide-adapter", seed=1, r=4)
    with pytest.raises(InvalidAdapterError, match="shape"):
        validate_adapter_dir(ad, model_cfg)


def test_file_level_refusals(copy: Path, model_cfg: ModelConfig, tmp_path: Path) -> None:
    size = (copy / "adapter_model.safetensors").stat().st_size
    with pytest.raises(InvalidAdapterError, match="the limit is"):
        validate_adapter_dir(copy, model_cfg, max_bytes=size - 1)
    validate_adapter_dir(copy, model_cfg, max_bytes=size)
    (copy / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        validate_adapter_dir(copy, model_cfg)
    (copy / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InvalidAdapterError, match="JSON object"):
        validate_adapter_dir(copy, model_cfg)
    # a pickled checkpoint is never read: without the safetensors file the adapter lacks its files
    pickled = Path(shutil.copytree(copy, tmp_path / "pickled"))
    torch.save({}, pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(FinetuneMissingFilesError):
        validate_adapter_dir(pickled, model_cfg)
    (copy / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (copy / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    with pytest.raises(InvalidAdapterError, match="safetensors"):
        validate_adapter_dir(copy, model_cfg)


def test_symlinked_weights_are_refused(good: Path, model_cfg: ModelConfig, tmp_path: Path) -> None:
    d = tmp_path / "linked"
    d.mkdir()
    shutil.copy(good / "adapter_config.json", d)
    (d / "adapter_model.safetensors").symlink_to(good / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapterError, match="regular file"):
        validate_adapter_dir(d, model_cfg)
