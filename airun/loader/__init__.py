"""Model sources (local folder, GGUF file, hub id, demo model), model config and weight iteration."""

from airun.loader.demo import DEMO_FILE, DEMO_PACKAGE, default_cache_dir, demo_model_path
from airun.loader.source import ModelSource, iter_weights, load_model_config, resolve_source

__all__ = [
    "DEMO_FILE",
    "DEMO_PACKAGE",
    "ModelSource",
    "default_cache_dir",
    "demo_model_path",
    "iter_weights",
    "load_model_config",
    "resolve_source",
]
