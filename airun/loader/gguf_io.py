"""GGUF checkpoints: model config from the metadata, and weights dequantized tensor by tensor under HF names.

GGUF stores a 2-D weight with dims ``[ne0, ne1] = [in_features, out_features]``; read as a row-major array that is
HF's ``[out_features, in_features]``, so no transpose is needed. llama.cpp's converter reorders the rows of q and k
of each head from HF's rotate-half layout (first half of a head = first component of every rotary pair) to the
interleaved layout (pairs adjacent); :func:`unpermute_rotary` restores HF's layout.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from airun.errors import ModelLoadError, UnsupportedModelError
from airun.model.config import ModelConfig

if TYPE_CHECKING:  # gguf is imported lazily: it costs ~0.25 s and only GGUF sources need it
    from gguf.gguf_reader import GGUFReader, ReaderTensor

SUPPORTED_ARCHS = ("llama", "mistral")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def open_gguf(path: Path) -> GGUFReader:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); ModelLoadError if it is not a readable GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    if reader.byte_order != "I":
        raise UnsupportedModelError(f"{path} is a byte-swapped (big-endian) GGUF file; only little-endian is supported")
    return reader


def _field(reader: GGUFReader, key: str) -> Any:
    """A scalar or string metadata value, a list for arrays, or None when the key is absent."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return None
    main = f.types[0] if f.types else None

    def one(idx: int, vtype: Any) -> Any:
        part = f.parts[idx]
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part[0]
        return bool(value) if vtype == GGUFValueType.BOOL else value.item()

    if main == GGUFValueType.ARRAY:
        return [one(i, f.types[-1]) for i in f.data]
    return one(f.data[0], main)


def _array_len(reader: GGUFReader, key: str) -> int | None:
    f = reader.fields.get(key)
    return None if f is None else len(f.data)


def _uniform(value: Any, key: str) -> Any:
    """A per-layer array is accepted only when every layer has the same value."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise UnsupportedModelError(f"GGUF key {key} varies per layer ({value[:8]}...); not supported")
        return value[0]
    return value


def config_from_gguf(reader: GGUFReader, name_or_path: str = "") -> ModelConfig:
    """ModelConfig from GGUF metadata (``{arch}.*`` keys, ``tokenizer.ggml.*`` ids).

    ``vocab_size`` is the length of the token list (it must match the embedding rows); ``tie_word_embeddings`` is
    True when the file has no ``output.weight``; ``eos_token_ids`` holds the EOS id, then the EOT/EOM ids when the file
    names them. Refuses what the decoder would compute wrong: other architectures, mixture-of-experts, partial
    rotary, RoPE scaling (including Llama 3.1's ``rope_freqs``), biases."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; airun runs Llama/Mistral-family models "
            f"(general.architecture 'llama' or 'mistral')"
        )

    def key(k: str, default: Any = None, required: bool = False) -> Any:
        v = _field(reader, f"{arch}.{k}")
        if v is None:
            if required:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{k}")
            return default
        return _uniform(v, f"{arch}.{k}")

    if (key("expert_count", 0) or 0) > 0:
        raise UnsupportedModelError("mixture-of-experts GGUF models (expert_count > 0) are not supported")
    scaling, factor = key("rope.scaling.type"), key("rope.scaling.factor")
    if scaling not in (None, "none") and (factor is None or float(factor) != 1.0):
        raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError("GGUF files with rope_freqs (Llama 3.1-style RoPE scaling) are not supported")
    biases = sorted(n for n in names if n.endswith(".bias"))
    if biases:
        raise UnsupportedModelError(f"GGUF files with bias tensors are not supported (found {biases[0]})")

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads) or heads)
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary_dims = key("rope.dimension_count")
    if rotary_dims is not None and int(rotary_dims) != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings ({rotary_dims} of {head_dim} dims) are not supported")
    value_dim = key("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise UnsupportedModelError("GGUF models with different key and value head sizes are not supported")

    n_tokens = _array_len(reader, "tokenizer.ggml.tokens")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    embd_rows = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else None
    vocab = n_tokens if n_tokens is not None else (key("vocab_size") or embd_rows)
    if vocab is None:
        raise ModelLoadError("GGUF file has neither a token list nor a token_embd.weight tensor: vocab size unknown")
    if embd_rows is not None and embd_rows != vocab:
        raise ModelLoadError(f"GGUF token list has {vocab} tokens but token_embd.weight has {embd_rows} rows")

    eos_ids: list[int] = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _field(reader, k)
        if v is not None and int(v) not in eos_ids:
            eos_ids.append(int(v))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    window = key("attention.sliding_window")
    cfg = ModelConfig(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_hidden_layers=int(key("block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        sliding_window=int(window) if window else None,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        name_or_path=name_or_path,
    )
    cfg.check()
    return cfg


def hf_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).
    Raises UnsupportedModelError for a tensor the Llama/Mistral decoder has no place for."""
    base, _, kind = gguf_name.rpartition(".")
    if kind == "weight":
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.weight"
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
            return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no counterpart in a Llama/Mistral decoder")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from llama.cpp's interleaved rotary layout back to HF's rotate-half layout.

    Within each head of ``d`` rows, GGUF row ``2*j + c`` holds component ``c`` (0 or 1) of rotary pair ``j``; HF keeps
    that row at ``c * d/2 + j``. Returns a new contiguous tensor of the same shape."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelLoadError(f"cannot un-permute a q/k weight with {rows} rows into {n_heads} heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def tensor_to_torch(t: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor as a torch tensor that owns its memory, in HF orientation (GGUF dims reversed).
    F32/F16/BF16 keep their dtype; quantized types are dequantized with ``gguf.quants.dequantize`` to float32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if qtype in (Q.F32, Q.F16):
        arr = np.array(t.data, copy=True)
        return torch.from_numpy(arr).reshape(shape)
    if qtype == Q.BF16:
        arr = np.array(t.data, copy=True).view(np.int16)
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    try:
        arr = dequantize(t.data, qtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"GGUF tensor {t.name} has type {qtype.name}, which cannot be dequantized") from e
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
    return torch.from_numpy(arr).reshape(shape)


def _drop_pages(reader: GGUFReader, start: int, nbytes: int) -> None:
    """Releases the pages of one tensor's bytes from the reader's memory map (they stay readable)."""
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's underlying mmap.mmap
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None or nbytes <= 0:
        return
    lo = start - start % mmap.PAGESIZE
    mm.madvise(advice, lo, min(start + nbytes, len(mm)) - lo)


def iter_gguf(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every tensor of the file, in file order; q/k un-permuted with the config's head
    counts. Each tensor is produced only when asked for; the file pages it came from are released after it."""
    for t in reader.tensors:
        name = hf_name(t.name)
        tensor = tensor_to_torch(t)
        if name.endswith("self_attn.q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        yield name, tensor
        del tensor
        _drop_pages(reader, int(t.data_offset), int(t.n_bytes))


def tensor_count(reader: GGUFReader) -> int:
    return len(reader.tensors)

