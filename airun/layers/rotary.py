"""Rotary position embeddings in Hugging Face's rotate-half layout."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at given absolute positions.

    Invariant: ``cos_sin[p] = (cos(p * f_i), sin(p * f_i))`` for ``f_i = theta ** (-2i / d)``, computed in float32 exactly as
    transformers computes its frequencies, for every position below ``max_positions``.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.half = head_dim // 2
        self.register_buffer("cos", torch.empty(max_positions, self.half, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, self.half, dtype=torch.float32), persistent=False)

    def reset(self) -> None:
        """(Re)computes the tables on the buffers' device; needed after the module was built on ``meta``."""
        dev = self.cos.device
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=dev).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exps)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.int64, device=dev).float(), inv_freq)
        self.cos = freqs.cos()
        self.sin = freqs.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at ``positions`` as [T, 1, d/2] in ``dtype``: computed once per step, shared by all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE of x [T, heads, d] (HF layout), in x's dtype."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
