"""Multi-LoRA serving: PEFT adapters (validation and loading), the resident-adapter manager, the fine-tune registry.

The LoRA layers themselves are in :mod:`airun.layers.lora`; the errors of this area (codes 5005, 3037, 3039) are in
:mod:`airun.errors` and re-exported here.
"""

from airun.errors import FinetuneMissingFilesError, FinetuneNotFoundError, InvalidAdapterError, LoRANotSupportedError
from airun.lora.adapter import (
    ADAPTER_FILES,
    CONFIG_FILE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RANK,
    WEIGHTS_FILE,
    AdapterConfig,
    LoRAAdapter,
    load_adapter,
    parse_adapter_config,
    validate_adapter_dir,
)
from airun.lora.manager import LoRAManager
from airun.lora.registry import AdapterResolver, Finetune, FinetuneRegistry, adapter_signature, default_data_dir

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_RANK",
    "WEIGHTS_FILE",
    "AdapterConfig",
    "AdapterResolver",
    "Finetune",
    "FinetuneMissingFilesError",
    "FinetuneNotFoundError",
    "FinetuneRegistry",
    "InvalidAdapterError",
    "LoRAAdapter",
    "LoRAManager",
    "LoRANotSupportedError",
    "adapter_signature",
    "default_data_dir",
    "load_adapter",
    "parse_adapter_config",
    "validate_adapter_dir",
]
