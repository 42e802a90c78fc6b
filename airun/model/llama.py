"""The Mistral / Llama decoder: RMSNorm, rotary embeddings, grouped-query paged attention, SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from airun import native
from airun.layers import int4_vnni
from airun.layers.attention import AttentionMetadata, paged_attention
from airun.layers.int4_vnni import Int4VnniLinear
from airun.layers.packed import pack_linears, packing_supported
from airun.layers.rotary import RotaryEmbedding
from airun.model.config import ModelConfig

if TYPE_CHECKING:
    from airun.model.quantize import QuantPlan


def _fusable(x: torch.Tensor) -> bool:
    """Whether airun's fused C++ ops (:mod:`airun.native`) take this activation: a contiguous CPU float32 or bfloat16
    tensor. They compute what the PyTorch code beside each call computes, with the same roundings."""
    cpu_dtype = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return cpu_dtype and x.is_contiguous() and native.available()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``, ``(norm(residual + x), residual + x)`` where the sum is written into
        ``residual`` in place (the layer's residual stream)."""
        fused = _fusable(x) and x.dim() == 2 and x.shape[-1] % 16 == 0 and self.weight.dtype == x.dtype
        if residual is not None:
            if fused and residual.is_contiguous():
                return torch.ops.airun_fused.add_rms_norm(x, residual, self.weight, self.eps), residual
            residual = residual + x
            return self._norm(residual), residual
        if fused:
            return torch.ops.airun_fused.rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Match transformers: normalize in float32, scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """q/k/v are one fused projection (``qkv_proj``), loaded from the checkpoint's separate q/k/v weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj.forward(x)
        t = x.shape[0]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if _fusable(qkv) and self.head_dim % 32 == 0 and self.k_cache.dim() == 4 and self.k_cache.is_contiguous():
            # rotary q and k, and the k/v cache write, in one pass
            q, k = torch.ops.airun_fused.rope_kv(qkv, rope[0], rope[1], self.k_cache, self.v_cache, meta.slot_mapping,
                                                 self.num_heads, self.num_kv_heads)
            o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, cache_written=True)
            return self.o_proj.forward(o)
        q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = RotaryEmbedding.apply(q.view(t, self.num_heads, self.head_dim), *rope)
        k = RotaryEmbedding.apply(k.view(t, self.num_kv_heads, self.head_dim), *rope)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj.forward(o)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        if gate_up.dim() == 2 and _fusable(gate_up):
            return self.down_proj.forward(torch.ops.airun_fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual stream before it)``: the layer's output is their sum, which the next norm forms
        (``x`` is the previous layer's mlp output, or the embeddings with ``residual`` None for the first layer)."""
        if residual is None:
            h, residual = self.input_layernorm.forward(x), x
        else:
            h, residual = self.input_layernorm.forward(x, residual)
        h, residual = self.post_attention_layernorm.forward(self.self_attn.forward(rope, h, meta), residual)
        return self.mlp.forward(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# Checkpoint projections that land in a slice of a fused parameter: name -> (fused name, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """A Mistral/Llama causal LM over a flat batch of tokens with a paged KV cache.

    Inside the decoder, submodules are called through ``.forward``: nothing registers hooks there, and
    ``nn.Module.__call__``'s hook dispatch cost ~0.4 ms of a 5.5 ms decode step of the demo model (270 calls). The
    head (``lm_head``) and the embedding are called as modules, so hooks on them work. A decode-only step with int4
    VNNI projections runs each layer as one native op (``airun/csrc/decoder_layer.cpp``: the same ops, in the same
    order, as the Python path, so the same bits) and skips the submodules' ``forward`` entirely.

    Parameter names follow Hugging Face's, except that q/k/v and gate/up are fused (``qkv_proj``, ``gate_up_proj``).
    With tied embeddings ``lm_head.weight`` is the embedding matrix.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    fuse_decode_layers = True  # decode-only steps run each layer as one native op where the layers allow it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary.lookup(positions, x.dtype)
        residual = None
        fused = self._fused_decode_args(x, meta)
        if fused is not None:
            levels = int4_vnni.activation_levels()
            step = (meta.slot_mapping, meta.decode_block_tables, meta.decode_ctx_lens)
            for norm1, norm2, eps, projections, caches, shape in fused:
                x, residual = torch.ops.airun_layer.decode.default(
                    x, residual, norm1, norm2, eps, *projections, levels, *rope, *caches, *step, *shape
                )
        else:
            for layer in self.model.layers:
                x, residual = layer.forward(rope, x, residual, meta)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm(x, residual)[0]

    def _fused_decode_args(self, x: torch.Tensor, meta: AttentionMetadata) -> list[tuple] | None:
        """Per layer, the arguments of ``airun_layer.decode`` that the layer fixes, when this step is decode-only and
        every layer takes the op: int4 VNNI projections (no LoRA wrapper), native kernels, a CPU activation in the
        norms' dtype. None otherwise: the Python path runs, computing the same thing. The per-layer part is built once
        per set of KV caches (the modules and their buffers are fixed by then: loading, quantization and LoRA wrapping
        come first)."""
        if not (self.fuse_decode_layers and meta.num_prefill_tokens == 0 and meta.decode_ctx_lens is not None):
            return None
        if not (x.dim() == 2 and x.shape[0] == meta.num_decode and _fusable(x) and x.shape[1] % 16 == 0):
            return None
        layers = self.model.layers
        key = id(layers[0].self_attn.k_cache) if len(layers) else None
        cached = self.__dict__.get("_fused_decode")
        if cached is None or cached[0] != key:
            cached = (key, self._build_fused_decode_args())
            self.__dict__["_fused_decode"] = cached
        args = cached[1]
        if args is None or args[0][0].dtype != x.dtype:
            return None
        return args

    def _build_fused_decode_args(self) -> list[tuple] | None:
        out = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(type(p) is Int4VnniLinear for p in projections) or not native.available():
                return None
            k, v = attn.k_cache, attn.v_cache
            if k.dim() != 4 or not k.is_contiguous() or attn.head_dim not in (32, 64, 128, 256):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            dtype = norms[0].weight.dtype
            if norms[1].weight.dtype != dtype or k.dtype != dtype or norms[0].eps != norms[1].eps:
                return None
            weights = tuple(a for p in projections for a in (p.qdata, p.asym))
            out.append((norms[0].weight, norms[1].weight, norms[0].eps, weights, (k, v),
                        (attn.num_heads, attn.num_kv_heads, attn.scale)))
        return out or None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _shard_slice(self, fused: str, index: int) -> tuple[int, int]:
        cfg = self.config
        if fused == "qkv_proj":
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            return [(0, q), (q, kv), (q + kv, kv)][index]
        inter = cfg.intermediate_size
        return (index * inter, inter)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (HF names) into the parameters; raises if any parameter is left unset."""
        params = dict(self.named_parameters(remove_duplicate=False))
        unset = set(dict(self.named_parameters()).keys())
        shards_seen: dict[str, set[int]] = {}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            parts = name.rsplit(".", 2)
            target, rows, idx = name, None, -1
            if len(parts) == 3 and parts[1] in _FUSED:
                fused, idx = _FUSED[parts[1]]
                target = f"{parts[0]}.{fused}.{parts[2]}"
                rows = self._shard_slice(fused, idx)
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {name} has no place in the model")
            dst = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model {tuple(dst.shape)}")
            dst.copy_(tensor)
            seen = shards_seen.setdefault(target, set())
            seen.add(idx)
            if rows is None or len(seen) == (3 if target.endswith("qkv_proj.weight") else 2):
                unset.discard(target)
        missing = sorted(unset)
        if missing:
            raise KeyError(f"checkpoint is missing tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")


def build_model(
    cfg: ModelConfig,
    weights: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quant: QuantPlan | None = None,
) -> CausalLM:
    """Builds the module on ``meta``, allocates each parameter once on ``device`` in ``dtype``, then copies the
    checkpoint tensors in one at a time: peak memory is the model plus one checkpoint tensor. With ``quant``, the
    planned linears are swapped for quantized ones before allocation and their tensors are quantized as they stream
    in (see :mod:`airun.model.quantize`), so no full-precision copy of them is ever held."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(cfg, max_positions)
    finally:
        torch.set_default_dtype(prev)
    loader = None
    if quant is not None:
        from airun.model.quantize import QuantLoader

        loader = QuantLoader(model, quant, device)
        weights = loader.intercept(weights)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # to_empty() unties: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset()
    model.load_weights(weights)
    if loader is not None:
        loader.finish()
    if packing_supported(device, dtype):  # bf16 on CPU: weights reordered once for oneDNN, not on every call
        pack_linears(model)
    return model.eval().requires_grad_(False)
