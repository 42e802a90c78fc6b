"""PEFT LoRA adapters: reading, validating against the served model, loading the weights.

An adapter is a folder with exactly the two files PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (never a pickle). Everything airun would compute differently from PEFT is refused with an
:class:`~airun.errors.InvalidAdapterError` that says what and why.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from airun.errors import FinetuneMissingFilesError, InvalidAdapterError
from airun.layers.lora import LORA_TARGETS, target_shapes
from airun.model.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
DEFAULT_MAX_RANK = 32
DEFAULT_MAX_BYTES = 500 * 10**6  # the published cap on adapter_model.safetensors
MAX_CONFIG_BYTES = 1 << 20
_PREFIX = "base_model.model."
_TENSOR_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Config keys that change what the adapter computes; each must be absent or hold its neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "exclude_modules": (None, [], ""),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),
}


@dataclass(slots=True, frozen=True)
class AdapterConfig:
    """What an ``adapter_config.json`` says, reduced to what the engine computes.

    Invariants: ``1 <= r <= max rank``; ``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA);
    ``targets`` is a non-empty subset of :data:`LORA_TARGETS` names matched against module paths (a list entry matches a
    path equal to it or ending in ``"." + entry``; a string is a full-match regular expression); ``layers`` is None for
    every layer."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    layers: frozenset[int] | None
    base_model_name_or_path: str | None = None
    model_type: str | None = None

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targeted(self, num_layers: int) -> set[tuple[int, str]]:
        """The ``(layer, target)`` projections this config adapts in a model of ``num_layers`` layers."""
        out: set[tuple[int, str]] = set()
        for i in range(num_layers):
            if self.layers is not None and i not in self.layers:
                continue
            for t in LORA_TARGETS:
                path = f"model.layers.{i}.{_PARENT[t]}.{t}"
                if _matches(self.target_modules, path):
                    out.add((i, t))
        return out


@dataclass(slots=True, weakref_slot=True, eq=False)
class LoRAAdapter:
    """A validated adapter held in host memory: ``weights[(layer, target)] = (A [r, in], B [out, r])`` as PEFT stores
    them (B not yet scaled). ``key`` names this exact content (the engine's prefix-cache key and slot key)."""

    key: str
    path: Path
    config: AdapterConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for _, t in self.weights)

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _matches(target_modules: tuple[str, ...] | str, path: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def parse_adapter_config(d: Any, max_rank: int = DEFAULT_MAX_RANK) -> AdapterConfig:
    """Validates an ``adapter_config.json`` object on its own (no model needed)."""
    if not isinstance(d, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object")
    if d.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapterError(f"peft_type {d.get('peft_type')!r} is not supported: only LORA adapters are")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise InvalidAdapterError(f"task_type {d.get('task_type')!r} is not supported: adapters must be for CAUSAL_LM")
    r = d.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidAdapterError(f"r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise InvalidAdapterError(f"LoRA rank r={r} exceeds the maximum rank {max_rank} this server accepts")
    alpha = d.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapterError(f"lora_alpha must be a number, got {alpha!r}")
    if d.get("bias", "none") != "none":
        raise InvalidAdapterError(f"bias={d.get('bias')!r} is not supported: only bias='none' adapters are")
    for key, neutral in _NEUTRAL.items():
        if key in d and d[key] not in neutral:
            raise InvalidAdapterError(f"{key}={d[key]!r} is not supported")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise InvalidAdapterError(
            f"init_lora_weights={init!r}: this adapter expects a base model modified at its initialization; "
            "convert it to a plain LoRA (peft's path_initial_model_for_weight_conversion) first"
        )
    rslora = d.get("use_rslora", False)
    if rslora not in (True, False, None):
        raise InvalidAdapterError(f"use_rslora must be a boolean, got {rslora!r}")
    targets = _parse_targets(d.get("target_modules"))
    layers = _parse_layers(d.get("layers_to_transform"), d.get("layers_pattern"))
    base = d.get("base_model_name_or_path")
    mtype = d.get("model_type")
    return AdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(rslora),
        target_modules=targets,
        layers=layers,
        base_model_name_or_path=base if isinstance(base, str) else None,
        model_type=mtype if isinstance(mtype, str) else None,
    )


def _parse_targets(t: Any) -> tuple[str, ...] | str:
    allowed = ", ".join(LORA_TARGETS)
    if t == "all-linear":
        return LORA_TARGETS
    if isinstance(t, str):
        try:
            re.compile(t)
        except re.error as exc:
            raise InvalidAdapterError(f"target_modules {t!r} is not a valid regular expression: {exc}") from None
        for other in ("lm_head", "model.embed_tokens", "model.norm"):
            if re.fullmatch(t, other):
                raise InvalidAdapterError(f"target_modules {t!r} matches {other}; only {allowed} can be adapted")
        return t
    if not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t):
        raise InvalidAdapterError(f"target_modules must be a non-empty list of module names, got {t!r}")
    bad = sorted({x for x in t if x.rsplit(".", 1)[-1] not in LORA_TARGETS})
    if bad:
        raise InvalidAdapterError(f"target_modules {bad} are not supported; only {allowed} can be adapted")
    return tuple(t)


def _parse_layers(layers: Any, pattern: Any) -> frozenset[int] | None:
    if layers is None:
        return None
    if pattern not in (None, "layers", ["layers"]):
        raise InvalidAdapterError(f"layers_pattern {pattern!r} is not supported (this model's layers are 'layers')")
    items = [layers] if isinstance(layers, int) else layers
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise InvalidAdapterError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
    return frozenset(items)


def read_adapter_config(path: Path, max_rank: int = DEFAULT_MAX_RANK) -> AdapterConfig:
    """Reads and validates ``path`` (an ``adapter_config.json``)."""
    size = _regular_file_size(path)
    if size > MAX_CONFIG_BYTES:
        raise InvalidAdapterError(f"{CONFIG_FILE} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    return parse_adapter_config(data, max_rank)


def _regular_file_size(path: Path) -> int:
    """The size of ``path``, which must be a regular file and not a symbolic link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FinetuneMissingFilesError() from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidAdapterError(f"{path.name} must be a regular file")
    return st.st_size


def check_weights_header(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validates an ``adapter_model.safetensors`` structurally (size cap, a safetensors header, LoRA tensor names of
    supported targets, float dtypes) without reading its data. Returns ``name -> (dtype, shape)``."""
    size = _regular_file_size(path)
    if size > max_bytes:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is {size} bytes; the limit is {max_bytes}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    if not header:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no tensors")
    for name, (dtype, shape) in header.items():
        m = _TENSOR_RE.fullmatch(name.removeprefix(_PREFIX)) if name.startswith(_PREFIX) else None
        if m is None or m.group(3) not in LORA_TARGETS or _PARENT[m.group(3)] != m.group(2):
            raise InvalidAdapterError(
                f"tensor {name!r} is not a LoRA weight of a supported projection "
                f"(expected base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight)"
            )
        if dtype not in _DTYPES:
            raise InvalidAdapterError(f"tensor {name!r} has dtype {dtype}; F32, F16 or BF16 are supported")
        if len(shape) != 2:
            raise InvalidAdapterError(f"tensor {name!r} has shape {list(shape)}; LoRA weights are matrices")
    return header


def _tensor_name(layer: int, target: str, ab: str) -> str:
    return f"{_PREFIX}model.layers.{layer}.{_PARENT[target]}.{target}.lora_{ab}.weight"


def check_against_model(
    config: AdapterConfig, header: dict[str, tuple[str, tuple[int, ...]]], model: ModelConfig
) -> set[tuple[int, str]]:
    """Checks that config and tensors fit ``model``: same model family, the targeted projections exist, and the file
    holds exactly their A/B tensors with shapes ``[r, in]`` / ``[out, r]``. Returns the targeted projections."""
    if config.model_type is not None and config.model_type != model.model_type:
        raise InvalidAdapterError(
            f"the adapter is for model_type {config.model_type!r}; the served model is {model.model_type!r}"
        )
    n = model.num_hidden_layers
    if config.layers is not None and any(i >= n for i in config.layers):
        raise InvalidAdapterError(f"layers_to_transform {sorted(config.layers)} exceeds the model's {n} layers")
    targeted = config.targeted(n)
    if not targeted:
        raise InvalidAdapterError(f"target_modules {config.target_modules!r} matches no projection of the model")
    shapes = target_shapes(model)
    expected: dict[str, tuple[int, int]] = {}
    for layer, t in targeted:
        fan_in, fan_out = shapes[t]
        expected[_tensor_name(layer, t, "A")] = (config.r, fan_in)
        expected[_tensor_name(layer, t, "B")] = (fan_out, config.r)
    missing = sorted(set(expected) - set(header))
    if missing:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} lacks {len(missing)} tensors the config targets, e.g. {missing[0]}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds tensors the config does not target, e.g. {extra[0]}")
    for name, shape in expected.items():
        got = header[name][1]
        if got != shape:
            raise InvalidAdapterError(
                f"tensor {name} has shape {list(got)}; the model and r={config.r} need {list(shape)}"
            )
    return targeted


def validate_adapter_dir(
    path: Path, model: ModelConfig, max_rank: int = DEFAULT_MAX_RANK, max_bytes: int = DEFAULT_MAX_BYTES
) -> AdapterConfig:
    """Validates an adapter folder against ``model`` without loading its weights."""
    path = Path(path)
    if not all((path / f).exists() for f in ADAPTER_FILES):
        raise FinetuneMissingFilesError()
    config = read_adapter_config(path / CONFIG_FILE, max_rank)
    check_against_model(config, check_weights_header(path / WEIGHTS_FILE, max_bytes), model)
    return config


def load_adapter(
    path: Path,
    model: ModelConfig,
    key: str,
    max_rank: int = DEFAULT_MAX_RANK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoRAAdapter:
    """Validates the adapter folder ``path`` against ``model`` and reads its weights (in the file's dtype, on the CPU).
    Raises InvalidAdapterError / FinetuneMissingFilesError."""
    path = Path(path)
    config = validate_adapter_dir(path, model, max_rank, max_bytes)
    targeted = config.targeted(model.num_hidden_layers)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            for layer, t in sorted(targeted):
                a = f.get_tensor(_tensor_name(layer, t, "A"))
                b = f.get_tensor(_tensor_name(layer, t, "B"))
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise InvalidAdapterError(f"the LoRA weights of layer {layer} {t} hold NaN or infinite values")
                weights[(layer, t)] = (a, b)
    except (SafetensorError, OSError) as exc:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} could not be read: {exc}") from None
    return LoRAAdapter(key=key, path=path, config=config, weights=weights)
