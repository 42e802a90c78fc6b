"""Where a model comes from (local folder, GGUF file, hub id, the demo) and how its config and weights are read.

Only safetensors and GGUF are ever read: pickle checkpoints (``*.bin``, ``*.pt``, ...) can run code when loaded and
are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from airun.errors import ModelLoadError, UnsupportedModelError
from airun.loader import gguf_io, safetensors_io
from airun.loader.demo import demo_model_path
from airun.loader.progress import with_progress
from airun.model.config import ModelConfig

HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
]
HUB_IGNORE = ["consolidated*.safetensors"]  # Mistral's own-format duplicate of the HF shards
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
LOCAL_HINT = "To use a model on disk instead, give its path: airun serve --model /path/to/folder-or-file.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(slots=True, frozen=True)
class ModelSource:
    """A resolved model: ``kind == "hf"`` -> ``path`` is a folder with ``config.json`` and safetensors weights;
    ``kind == "gguf"`` -> ``path`` is a GGUF file. ``name`` is what the user asked for (hub id, path or "demo")."""

    kind: Literal["hf", "gguf"]
    path: Path
    name: str


def _pickle_error(where: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{where} holds only pickle weights (*.bin / *.pt): airun accepts only safetensors or GGUF checkpoints, "
        "because loading a pickle can run arbitrary code. Convert it to safetensors first."
    )


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _local_source(path: Path, name: str) -> ModelSource:
    """Classifies an existing path. Raises ModelLoadError when it is neither a usable HF folder nor a GGUF file."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            if not _is_gguf_file(path):
                raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
            return ModelSource("gguf", path, name)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        raise ModelLoadError(
            f"{path} is not a .gguf file; give a .gguf file or a folder holding config.json and *.safetensors"
        )
    files = [p for p in path.iterdir() if p.is_file()]
    has_config = (path / "config.json").is_file()
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    ggufs = sorted(p for p in files if p.suffix.lower() == ".gguf")
    if has_config and has_safetensors:
        return ModelSource("hf", path, name)
    if not has_safetensors and len(ggufs) == 1:
        return _local_source(ggufs[0], name)
    if len(ggufs) > 1 and not has_safetensors:
        listing = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{path} holds several GGUF files ({listing}); give the path of the one to load")
    if any(p.suffix.lower() in PICKLE_SUFFIXES for p in files) and not has_safetensors:
        raise _pickle_error(path)
    if not has_config:
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder (and no .gguf file in it)")
    raise ModelLoadError(
        f"{path} has a config.json but no *.safetensors weights (airun loads only safetensors or GGUF checkpoints)"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_error(repo: str, err: Exception) -> ModelLoadError:
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if _hub_offline() else f"{type(err).__name__}: {err}"
    return ModelLoadError(
        f"model {repo!r} is not a local path and could not be fetched from the Hugging Face Hub ({why}). {LOCAL_HINT}"
    )


def _hub_failures() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the hub could not give us this repo" (the hub's own errors are OSErrors; a bad repo
    id is a ValueError; raw transport errors may surface from httpx)."""
    failures: list[type[Exception]] = [OSError, ValueError]
    try:
        import httpx

        failures.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(failures)


def _hub_source(src: str, cache_dir: Path | None, revision: str | None) -> ModelSource:
    """Downloads (or finds in the hub cache) ``owner/name`` or ``owner/name:file.gguf``."""
    import huggingface_hub

    hub_cache = str(cache_dir / "hub") if cache_dir is not None else None
    offline = _hub_offline()
    failures = _hub_failures()
    repo, _, gguf_file = src.partition(":")
    try:
        if gguf_file:
            file = huggingface_hub.hf_hub_download(
                repo, gguf_file, revision=revision, cache_dir=hub_cache, local_files_only=offline
            )
            return _local_source(Path(file), src)
        folder = Path(
            huggingface_hub.snapshot_download(
                repo, revision=revision, cache_dir=hub_cache, allow_patterns=HUB_PATTERNS,
                ignore_patterns=HUB_IGNORE, local_files_only=offline,
            )
        )
        if (folder / "config.json").is_file() or offline:
            return _local_source(folder, src)
        # No HF checkpoint in the repo: a GGUF-only repo is accepted when it holds exactly one GGUF file.
        ggufs = [f for f in huggingface_hub.list_repo_files(repo, revision=revision) if f.lower().endswith(".gguf")]
    except failures as e:
        raise _hub_error(src, e) from e
    if len(ggufs) != 1:
        what = f"several GGUF files ({', '.join(ggufs[:8])})" if ggufs else "no config.json, safetensors or GGUF files"
        raise ModelLoadError(f"hub repo {repo!r} holds {what}; name one file as '{repo}:FILE.gguf'. {LOCAL_HINT}")
    try:
        file = huggingface_hub.hf_hub_download(repo, ggufs[0], revision=revision, cache_dir=hub_cache)
    except failures as e:
        raise _hub_error(src, e) from e
    return _local_source(Path(file), src)


def resolve_source(src: str | None, cache_dir: Path | None = None, revision: str | None = None) -> ModelSource:
    """Resolves what the user named: None or "demo" -> the demo GGUF (fetched into ``cache_dir`` on first use);
    an existing folder -> "hf"; an existing ``*.gguf`` file -> "gguf"; ``owner/name`` or ``owner/name:file.gguf`` that
    is not a local path -> downloaded from the Hugging Face Hub (into ``cache_dir/hub`` when ``cache_dir`` is given,
    else the standard hub cache; ``HF_HUB_OFFLINE=1`` uses the cache only).

    Raises ModelLoadError naming the path when a local path does not exist or is not a usable checkpoint (pickle-only
    folders included), and ModelLoadError with a local-path hint when a hub id cannot be fetched."""
    if src is None or src == "demo":
        return ModelSource("gguf", demo_model_path(cache_dir), "demo")
    path = Path(src).expanduser()
    if path.exists():
        return _local_source(path, src)
    repo = src.partition(":")[0]
    if _HUB_ID.match(repo) and not src.startswith((".", "/", "~")):
        return _hub_source(src, cache_dir, revision)
    raise ModelLoadError(f"model path {src!r} does not exist (and it is not a Hugging Face hub id like 'owner/name')")


def load_model_config(source: ModelSource) -> ModelConfig:
    """The architecture of ``source``: ``config.json`` (EOS ids of ``generation_config.json`` appended) for "hf",
    the metadata for "gguf". Raises UnsupportedModelError for an architecture airun does not compute."""
    if source.kind == "gguf":
        return gguf_io.config_from_gguf(gguf_io.open_gguf(source.path), source.name)
    cfg_path = source.path / "config.json"
    try:
        d = json.loads(cfg_path.read_text())
    except OSError as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from e
    except ValueError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
    quant = d.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedModelError(f"quantized Hugging Face checkpoints ({method}) are not supported; use a GGUF file")
    try:
        cfg = ModelConfig.from_hf_dict(d, name_or_path=source.name)
    except KeyError as e:
        raise ModelLoadError(f"{cfg_path} lacks the field {e}") from e
    gen_path = source.path / "generation_config.json"
    if gen_path.is_file():
        try:
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            gen_eos = None
        for eos in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
            if eos not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(eos)
    return cfg


def iter_weights(
    source: ModelSource, config: ModelConfig, show_progress: bool | None = None, native_quant: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs, one tensor at a time, HF names and HF rotary layout (see docs/ARCHITECTURE.md).

    The consumer copies each tensor into its own parameter before asking for the next one, and must not write to it:
    safetensors tensors are read-only views of the file whose pages are released once the next one is requested;
    GGUF tensors are dequantized to float32 (F16/BF16 keep their dtype). ``show_progress``: a tqdm bar on stderr
    (None: only when stderr is a terminal). ``native_quant``: GGUF Q4_0/Q4_1/Q4_K weights come instead as exact
    :class:`airun.layers.quant.Int4Weight` values (see :mod:`airun.loader.gguf_quant`), for a quantized model."""
    if source.kind == "gguf":
        reader = gguf_io.open_gguf(source.path)
        if native_quant:
            from airun.loader.gguf_quant import iter_gguf_native

            items = iter_gguf_native(reader, config)
        else:
            items = gguf_io.iter_gguf(reader, config)
        total = gguf_io.tensor_count(reader)
    else:
        files = safetensors_io.checkpoint_files(source.path)
        if not files:
            raise ModelLoadError(f"{source.path} has no *.safetensors weights")
        items = safetensors_io.iter_checkpoint(files)
        total = safetensors_io.count_tensors(files)
    return with_progress(items, total=total, desc=f"loading {source.path.name}", show=show_progress)
