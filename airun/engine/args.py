"""Engine configuration: what the CLI flags and the server settings map to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from airun.errors import InvalidRequestError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None  # None -> the demo model
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # context window allowed (prompt + max_tokens); default: the model's, capped
    kv_cache_memory_gb: float | None = None  # KV-cache budget; default: see kv_budget_bytes()
    kv_cache_prefault: bool = False  # commit the whole KV budget at start (a server's RSS then stays flat)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    max_loras_per_step: int | None = None
    threads: int | None = None  # intra-op threads; default: one per physical core
    seed: int = 0
    revision: str | None = None
    cache_dir: str | None = None
    show_progress: bool | None = None  # None: when stderr is a terminal
    quantize: str | None = None  # int8 | int4 | none; None: a GGUF in a 16-bit dtype keeps its quantized weights
    # Sequences in a step from which int4 and int8 layers on the native CPU kernels quantize activations to one int8
    # level (ggml's Q8_0 precision, ~1.6x their throughput there) instead of two; None: always two.
    one_level_from: int | None = 16
    enable_lora: bool = False  # serve LoRA adapters (requests with `lora`); False: such requests are refused (5005)
    max_loras: int = 8  # adapters resident at once (slots of the stacked LoRA weights); also caps adapters per step
    max_lora_rank: int = 32  # largest adapter rank accepted
    lora_modules: dict[str, str] = field(default_factory=dict)  # adapter name -> PEFT folder (--lora NAME=PATH)
    data_dir: str | None = None  # fine-tune registry root; None: $AIRUN_DATA_DIR or ~/.local/share/airun

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if bf16_supported(device) else torch.float32
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        return DTYPES[self.dtype]

    def kv_budget_bytes(self) -> int:
        if self.kv_cache_memory_gb is not None:
            return int(self.kv_cache_memory_gb * 2**30)
        return 2 * 2**30


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_threads() -> int:
    """One intra-op thread per physical core available to this process."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
        total_logical = psutil.cpu_count(logical=True) or logical
        per_core = max(1, total_logical // physical)
        return max(1, logical // per_core)
    except ImportError:
        return max(1, logical)
