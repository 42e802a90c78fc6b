"""Real tiny checkpoints for tests: a random transformers Mistral saved as safetensors, and GGUF files written with
the ``gguf`` package (F32/F16/BF16 and quantized tensors, llama.cpp's q/k row order)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def make_tiny_mistral(
    dir: Path,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int = 2048,
    max_shard_size: int | str | None = None,
) -> Path:
    """Saves a random ``transformers.MistralForCausalLM`` (rope_theta=1e6, no sliding window) as safetensors into
    ``dir`` and returns ``dir``. Every parameter is random, the RMSNorm weights included (so that swapped tensors are
    caught). ``max_shard_size`` (e.g. ``"100KB"``) splits it into shards with a ``model.safetensors.index.json``."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    model = model.to(dtype)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(dir, **kwargs)
    return dir


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved order, per head: HF row ``c*d/2 + j`` (component ``c`` of
    rotary pair ``j``) goes to row ``2*j + c``. Written from the layout definitions, independently of the loader."""
    rows = w.shape[0]
    d = rows // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for c in range(2):
            for j in range(d // 2):
                out[h * d + 2 * j + c] = w[h * d + c * (d // 2) + j]
    return out


GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name_of(hf: str) -> str:
    base = hf.removesuffix(".weight")
    if base in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[base] + ".weight"
    _, _, idx, rest = base.split(".", 3)
    return f"blk.{idx}.{GGUF_LAYER_NAMES[rest]}.weight"


def write_llama_gguf(
    path: Path,
    *,
    arch: str = "llama",
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    context_length: int = 2048,
    rope_theta: float = 1e6,
    rms_eps: float = 1e-5,
    bos: int = 1,
    eos: int = 2,
    tensors: Sequence[tuple[str, np.ndarray, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes a GGUF file with llama.cpp's metadata keys and the given ``(gguf_name, data, raw_dtype)`` tensors
    (``raw_dtype`` None: ``data`` is F32/F16 in HF orientation; else ``data`` is the raw uint8 bytes of that type)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", context_length)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", intermediate)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", rms_eps)
    w.add_uint32(f"{arch}.rope.dimension_count", hidden // heads)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    w.add_array("tokenizer.ggml.scores", [0.0] * vocab_size)
    w.add_array("tokenizer.ggml.token_type", [1] * vocab_size)
    w.add_uint32("tokenizer.ggml.bos_token_id", bos)
    w.add_uint32("tokenizer.ggml.eos_token_id", eos)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, data, raw_dtype in tensors:
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_from_hf_folder(folder: Path, path: Path, *, f16: bool = False) -> Path:
    """Converts a tiny HF Llama/Mistral safetensors folder to an F32 (or F16) GGUF the way llama.cpp lays it out
    (q/k rows permuted, ``output.weight`` left out when embeddings are tied)."""
    import json

    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    tensors = []
    for hf, arr in state.items():
        arr = arr.astype(np.float32)
        if hf.endswith("q_proj.weight"):
            arr = permute_for_gguf(arr, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            arr = permute_for_gguf(arr, cfg["num_key_value_heads"])
        if f16 and arr.ndim == 2:
            arr = arr.astype(np.float16)
        tensors.append((gguf_name_of(hf), arr, None))
    return write_llama_gguf(
        path,
        vocab_size=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_key_value_heads"],
        intermediate=cfg["intermediate_size"],
        context_length=cfg["max_position_embeddings"],
        rope_theta=float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]),
        rms_eps=cfg["rms_norm_eps"],
        tensors=tensors,
    )


def random_quant_blocks(qtype: Any, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes ``[rows, cols/block*type_size]`` of a ``qtype`` tensor holding random values. Types the ``gguf``
    package can quantize are quantized from random floats; K-quants (no quantizer there) are random bytes with
    finite float16 super-block scales at their places in the block layout."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16):
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scales = (rng.random((n_blocks, 2)) * 0.02).astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q2_K):  # d, dmin at the start of the block (Q2_K: at the end)
        at = 0 if qtype != Q.Q2_K else size - 4
        raw[:, at : at + 4] = scales
    elif qtype in (Q.Q6_K, Q.Q3_K):  # d at the end
        raw[:, size - 2 :] = scales[:, :2]
    else:
        raise ValueError(f"no random block recipe for {qtype.name}")
    return raw.reshape(rows, cols // block * size)
