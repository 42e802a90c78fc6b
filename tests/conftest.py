"""Shared fixtures: real models built or fetched once per test session (never from the hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random MistralForCausalLM (rope_theta 1e6, 8 query heads, 2 KV heads, no sliding window) saved as
    safetensors, with Mistral-7B-Instruct-v0.2's real tokenizer and chat template."""
    from tests.fixtures_models import make_tiny_mistral
    from tests.fixtures_text import make_mistral_tokenizer_dir

    d = tmp_path_factory.mktemp("tiny-mistral")
    make_tiny_mistral(d)
    make_mistral_tokenizer_dir(d)
    return d


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    from airun.loader.demo import demo_model_path

    return demo_model_path()
