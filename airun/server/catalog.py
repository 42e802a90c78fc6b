"""The model catalog: the Workers AI name a checkpoint is served under, its catalog entry, and catalog search.

Invariants: the entry of ``@hf/mistral/mistral-7b-instruct-v0.2`` is the published one (``airun/data``) except for
``context_window``, ``max_input_length`` and ``max_total_tokens``, which state what this server allows, and ``lora``,
which states whether this server runs adapters; any other model gets an entry of the same shape with the same
text-generation schema. Entries are fresh copies: callers may change them.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from airun.model.config import ModelConfig

MISTRAL_V02_NAME = "@hf/mistral/mistral-7b-instruct-v0.2"
MISTRAL_V02_FILE = "mistral-7b-instruct-v0.2.json"
TEXT_GENERATION_TASK = "Text Generation"
_QUANT_SUFFIX = re.compile(r"[.\-_](?:i?q\d[\w]*|f16|f32|bf16|fp16|fp32|gguf)$", re.IGNORECASE)
_HF_CACHE_DIR = re.compile(r"^models--([^/]+?)--(.+)$")
_UNSAFE = re.compile(r"[^a-z0-9._-]+")


@cache
def _published_entry() -> dict[str, Any]:
    text = resources.files("airun").joinpath("data", MISTRAL_V02_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def published_entry() -> dict[str, Any]:
    """The catalog entry of Mistral-7B-Instruct-v0.2 exactly as Workers AI publishes it (a copy)."""
    return copy.deepcopy(_published_entry())


def text_generation_schema() -> dict[str, Any]:
    """The published input/output JSON Schema of the text-generation models (a copy)."""
    return copy.deepcopy(_published_entry()["schema"])


# ---- names ----------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return _UNSAFE.sub("-", text.strip().lower()).strip("-.") or "model"


def is_mistral_7b_instruct_v02(source_name: str, config: ModelConfig | None = None) -> bool:
    """True for a Mistral-7B-Instruct-v0.2 checkpoint: named so (hub id, folder or file), or with exactly its
    architecture (32 layers of 4096, 32 heads / 8 KV heads, vocabulary 32000, rope theta 1e6, no sliding window)."""
    if "mistral-7b-instruct-v0.2" in source_name.lower():
        return True
    if config is None:
        return False
    return (
        config.model_type == "mistral"
        and config.hidden_size == 4096
        and config.intermediate_size == 14336
        and config.num_hidden_layers == 32
        and config.num_attention_heads == 32
        and config.num_key_value_heads == 8
        and config.vocab_size == 32000
        and config.rope_theta == 1e6
        and config.sliding_window is None
    )


def _gguf_organization(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.organization")
        return str(field.contents()) if field is not None else None
    except Exception:  # unreadable metadata only costs us the organization in the name
        return None


def default_served_name(source_name: str, path: Path | None = None, kind: str | None = None,
                        config: ModelConfig | None = None) -> str:
    """``@hf/<organization>/<model>`` in lower case: the published name for Mistral-7B-Instruct-v0.2; for a hub id
    ``org/name`` its two parts; for a GGUF file its stem without the quantization suffix and the organization of its
    metadata; for a Hugging Face cache folder (``models--org--name``) its two parts; else ``@hf/local/<name>``."""
    names = [source_name] + ([str(path)] if path is not None else [])
    if any(is_mistral_7b_instruct_v02(n) for n in names) or is_mistral_7b_instruct_v02("", config):
        return MISTRAL_V02_NAME
    org: str | None = None
    model: str | None = None
    if path is not None:
        for part in reversed(path.parts):
            m = _HF_CACHE_DIR.match(part)
            if m:
                org, model = m.group(1), m.group(2)
                break
        if kind == "gguf" or path.suffix.lower() == ".gguf":
            model = path.stem
            while _QUANT_SUFFIX.search(model):
                model = _QUANT_SUFFIX.sub("", model)
            org = _gguf_organization(path) or org
        elif model is None:
            model = path.name
    repo = source_name.partition(":")[0]
    if model is None and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        org, model = repo.split("/")
    if model is None:
        model = Path(source_name).name or source_name
    return f"@hf/{_slug(org or 'local')}/{_slug(model)}"


# ---- entries --------------------------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class ServedModel:
    """The one model this server runs, as the catalog and the routes see it."""

    name: str  # the Workers AI name requests use
    source_name: str  # what it was loaded from (hub id, path, "demo")
    model_type: str
    max_model_len: int
    supports_lora: bool


def _set_property(entry: dict[str, Any], key: str, value: str) -> None:
    props = entry.setdefault("properties", [])
    for p in props:
        if p.get("property_id") == key:
            p["value"] = value
            return
    props.append({"property_id": key, "value": value})


def catalog_entry(model: ServedModel) -> dict[str, Any]:
    if model.name == MISTRAL_V02_NAME:
        entry = published_entry()
    else:
        base = _published_entry()
        entry = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "airun:" + model.name)),
            "source": 1,
            "name": model.name,
            "description": f"{model.source_name} ({model.model_type} architecture), served by airun.",
            "task": copy.deepcopy(base["task"]),
            "created_at": base["created_at"],
            "tags": [],
            "properties": [],
            "schema": text_generation_schema(),
        }
    _set_property(entry, "context_window", str(model.max_model_len))
    _set_property(entry, "max_input_length", str(max(1, model.max_model_len - 1)))
    _set_property(entry, "max_total_tokens", str(model.max_model_len))
    _set_property(entry, "lora", "true" if model.supports_lora else "false")
    return entry


def _author(name: str) -> str:
    parts = name.lstrip("@").split("/")
    return parts[1] if len(parts) >= 3 else parts[0]


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on"}


def search(entries: list[dict[str, Any]], *, search: str | None = None, task: str | None = None,
           author: str | None = None, source: int | None = None, hide_experimental: str | None = None
           ) -> list[dict[str, Any]]:
    """The entries matching every given filter: ``search`` is a case-insensitive substring of the name or the
    description; ``task`` the task's name or id; ``author`` the organization part of the name; ``source`` the
    entry's source number; ``hide_experimental`` drops entries whose ``experimental`` property is true."""
    out = []
    for e in entries:
        if search and search.lower() not in (e["name"] + " " + e.get("description", "")).lower():
            continue
        if task and task.lower() not in {e["task"]["name"].lower(), e["task"]["id"].lower()}:
            continue
        if author and author.lower() != _author(e["name"]).lower():
            continue
        if source is not None and e.get("source") != source:
            continue
        props = {p["property_id"]: p["value"] for p in e.get("properties", [])}
        if _truthy(hide_experimental) and _truthy(props.get("experimental")):
            continue
        out.append(e)
    return out
