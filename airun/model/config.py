"""The architecture hyper-parameters of a Mistral/Llama decoder, whatever the checkpoint format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airun.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama"}


@dataclass(slots=True)
class ModelConfig:
    """Invariants: ``num_attention_heads % num_key_value_heads == 0``; ``head_dim`` is even;
    ``sliding_window`` is None when the model attends to its whole context."""

    model_type: str  # "mistral" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name_or_path: str = ""

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name_or_path: str = "") -> "ModelConfig":
        """Builds the config from a Hugging Face ``config.json``; refuses what airun would compute wrong."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type", "")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"architecture {archs} is not supported; airun runs MistralForCausalLM and LlamaForCausalLM"
            )
        if model_type not in ("mistral", "llama"):
            raise UnsupportedModelError(f"model_type {model_type!r} is not supported (expected 'mistral' or 'llama')")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {d.get('hidden_act')!r} is not supported (expected 'silu')")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise UnsupportedModelError("attention_bias / mlp_bias checkpoints are not supported")
        rope_scaling = d.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
            raise UnsupportedModelError(f"rope_scaling {rope_scaling!r} is not supported")
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = d.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        sliding = d.get("sliding_window")
        if d.get("use_sliding_window") is False:
            sliding = None
        cfg = cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name_or_path=name_or_path,
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise UnsupportedModelError("head_dim must be even for rotary embeddings")

    @property
    def context_limit(self) -> int:
        """The longest sequence this model computes correctly: its trained context, cut at a sliding window."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings
