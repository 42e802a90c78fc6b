"""Real PEFT LoRA adapters for the tiny random Mistral of the tests, built and saved with the ``peft`` library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_dir: Path, out_dir: Path, *, seed: int, r: int = 8, lora_alpha: float = 16,
                      target_modules: list[str] | str = ALL_TARGETS, **lora_kw: Any) -> Path:
    """Wraps the transformers model saved in ``base_dir`` with a peft LoRA whose A and B are both random
    (``init_lora_weights=False``), and saves the adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    base = MistralForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, init_lora_weights=False,
                     task_type="CAUSAL_LM", **lora_kw)
    model = get_peft_model(base, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


def load_peft_model(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """The transformers base model with the saved adapter applied by peft (not merged), float32, eval mode."""
    from peft import PeftModel
    from transformers import MistralForCausalLM

    base = MistralForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()
