"""GGUF weights kept quantized: 4-bit types repacked exactly into group-wise int4, the others described by the
precision class a quantized layer keeps for them.

Block layouts (little-endian; ``K`` values per row, blocks along a row):

- Q4_0, 32 values in 18 bytes: ``d`` f16, 16 bytes of codes; byte ``j`` holds value ``j`` (low nibble) and
  ``j + 16`` (high nibble); ``w = d * (q - 8)``.
- Q4_1, 32 values in 20 bytes: ``d`` f16, ``m`` f16, codes as Q4_0; ``w = d * q + m``.
- Q4_K, 256 values in 144 bytes: ``d`` f16, ``dmin`` f16, 12 bytes packing eight 6-bit scales ``sc[j]`` and mins
  ``mn[j]``, 128 bytes of codes: bytes ``[32c, 32c + 32)`` hold sub-block ``2c`` in their low nibbles and ``2c + 1`` in
  their high nibbles; sub-block ``j`` (32 values) is ``w = d * sc[j] * q - dmin * mn[j]``.

All three are ``w = scale * q + min`` per group of 32 with ``q`` in ``[0, 15]`` (:class:`Int4Weight`), so they are
repacked without loss: the float32 values :meth:`Int4Weight.dequantize` gives are bit-identical to ggml's dequantization
(``gguf.quants.dequantize``). Only the kernel's bfloat16 copy of scale and ``zero = min + 8 * scale`` rounds.

Precision classes (:data:`NATIVE_FORMAT`): Q4_0 / Q4_1 / Q4_K -> int4 (exact). Q8_0, Q5_0, Q5_1, Q5_K, Q6_K -> int8 per
output channel, a requantization of the dequantized values: for 5- and 6-bit formats the per-channel int8 step is
finer than the format's own sub-block step, so it adds less error than the format already has (measured in
``tests/test_quant_gguf.py``); a 4-bit group-wise layout would add more than the format's own error (a 16-level grid
in place of a 32- or 64-level one), so it is never chosen for them. Q8_0's block-32 scales become one scale per row:
that adds error of the order of Q8_0's own (reported by ``bench/quant_errors.py``). F32 / F16 / BF16 and the other
types (Q2_K, Q3_K, IQ*) stay float: they are dequantized as before.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from airun.errors import ModelLoadError
from airun.layers.quant import Int4Weight, QuantFormat
from airun.loader.gguf_io import _drop_pages, hf_name, tensor_to_torch, unpermute_rotary
from airun.model.config import ModelConfig

if TYPE_CHECKING:
    from gguf.gguf_reader import GGUFReader, ReaderTensor

GROUP = 32  # values per scale of every 4-bit GGUF format


def _native_formats() -> dict[int, QuantFormat]:
    from gguf import GGMLQuantizationType as Q

    return {
        Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q4_K: "int4",
        Q.Q8_0: "int8", Q.Q5_0: "int8", Q.Q5_1: "int8", Q.Q5_K: "int8", Q.Q6_K: "int8",
    }


def native_format(qtype: int) -> QuantFormat | None:
    """The quantized layer format that keeps a GGUF tensor type's precision class; None: stays float."""
    return _native_formats().get(int(qtype))


def is_exact_int4(qtype: int) -> bool:
    """Whether :func:`repack_int4` converts this type without loss."""
    from gguf import GGMLQuantizationType as Q

    return int(qtype) in (Q.Q4_0, Q.Q4_1, Q.Q4_K)


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def read_tensor_types(path: Path) -> dict[str, tuple[int, int]]:
    """GGUF tensor name -> (ggml type, number of dimensions), read from the file header alone.

    ``gguf.GGUFReader`` decodes every metadata value (the token list too: seconds for a 49k vocabulary); this walks
    the key/value section by lengths only. Layout (little-endian, GGUF v2/v3): magic, u32 version, u64 tensor count,
    u64 kv count; kv = string key, u32 value type, value (string = u64 length + bytes; array = u32 element type, u64
    count, elements); then per tensor: string name, u32 n_dims, u64 dims, u32 type, u64 offset. Raises ModelLoadError
    on anything else (big-endian or v1 files, truncation)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ModelLoadError(f"{path}: not a little-endian GGUF v2/v3 file")
        pos = 24

        def skip_string(p: int) -> int:
            return p + 8 + struct.unpack_from("<Q", buf, p)[0]

        for _ in range(n_kv):
            pos = skip_string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype == _STRING:
                    for _ in range(count):
                        pos = skip_string(pos)
                elif etype in _SCALAR_SIZES:
                    pos += count * _SCALAR_SIZES[etype]
                else:
                    raise ModelLoadError(f"{path}: unsupported GGUF array element type {etype}")
            elif vtype == _STRING:
                pos = skip_string(pos)
            elif vtype in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[vtype]
            else:
                raise ModelLoadError(f"{path}: unsupported GGUF value type {vtype}")
        out: dict[str, tuple[int, int]] = {}
        for _ in range(n_tensors):
            (length,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8")
            pos += 8 + length
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims
            (ttype,) = struct.unpack_from("<I", buf, pos)
            pos += 12
            out[name] = (ttype, n_dims)
        return out
    except (struct.error, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: truncated or malformed GGUF header ({e})") from e
    finally:
        buf.close()


def tensor_formats(path: Path) -> dict[str, QuantFormat | None]:
    """HF name -> native format (:func:`native_format`) of every 2-D tensor of the GGUF file at ``path``."""
    return {hf_name(n): native_format(t) for n, (t, dims) in read_tensor_types(path).items() if dims == 2}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` bytes -> ``[...]`` float32 (little-endian float16)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[..., 16*c]`` code bytes -> ``[..., 32*c]`` codes: low nibbles first, then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _k_scales_mins(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a K-quant super-block from its 12 bytes ``[..., 12]`` (uint8).
    Pairs 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins). Pairs 4-7: low / high nibble of bytes 8-11, with
    bits 4-5 from the top two bits of bytes 0-3 (scales) and 4-7 (mins)."""
    a, b, c = sc[..., 0:4].int(), sc[..., 4:8].int(), sc[..., 8:12].int()
    scales = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def repack_int4(raw: torch.Tensor, qtype: int, k: int) -> Int4Weight:
    """The exact :class:`Int4Weight` (group 32) of a Q4_0 / Q4_1 / Q4_K tensor with ``k`` values per row, from its
    raw bytes ``[N, bytes_per_row]`` (uint8). Raises ValueError for another type."""
    from gguf import GGMLQuantizationType as Q

    n = raw.shape[0]
    if int(qtype) in (Q.Q4_0, Q.Q4_1):
        size = 18 if int(qtype) == Q.Q4_0 else 20
        blocks = raw.reshape(n, k // GROUP, size)
        d = _f16(blocks[..., 0:2])
        codes = _nibbles(blocks[..., size - 16 :])
        mins = -8.0 * d if int(qtype) == Q.Q4_0 else _f16(blocks[..., 2:4])
        return Int4Weight(codes.reshape(n, k).contiguous(), d, mins.contiguous(), GROUP)
    if int(qtype) == Q.Q4_K:
        blocks = raw.reshape(n, k // 256, 144)
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = _k_scales_mins(blocks[..., 4:16])
        codes = _nibbles(blocks[..., 16:].reshape(n, k // 256, 4, 32))  # [N, super, 4, 64]: sub-blocks 2c, 2c+1
        scales = (d[..., None] * sc).reshape(n, k // GROUP)
        mins = (-(dmin[..., None] * mn)).reshape(n, k // GROUP)
        return Int4Weight(codes.reshape(n, k).contiguous(), scales, mins, GROUP)
    raise ValueError(f"GGUF type {qtype!r} has no exact int4 repacking")


def tensor_value(t: ReaderTensor) -> torch.Tensor | Int4Weight:
    """One GGUF tensor in HF orientation: an :class:`Int4Weight` for Q4_0 / Q4_1 / Q4_K, else as
    :func:`airun.loader.gguf_io.tensor_to_torch` gives it (dequantized to float32 or kept F32/F16/BF16)."""
    if len(t.shape) == 2 and is_exact_int4(t.tensor_type):
        k = int(t.shape[0])
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
        return repack_int4(raw, int(t.tensor_type), k)
    return tensor_to_torch(t)


def iter_gguf_native(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """As :func:`airun.loader.gguf_io.iter_gguf`, but Q4_0 / Q4_1 / Q4_K weights come as :class:`Int4Weight`
    (rows of q / k un-permuted like the float ones); the file pages of each tensor are released after it."""
    for t in reader.tensors:
        name = hf_name(t.name)
        value = tensor_value(t)
        heads = None
        if name.endswith("self_attn.q_proj.weight"):
            heads = config.num_attention_heads
        elif name.endswith("self_attn.k_proj.weight"):
            heads = config.num_key_value_heads
        if heads is not None:
            h = heads
            if isinstance(value, Int4Weight):
                value = value.map_rows(lambda x: unpermute_rotary(x, h))
            else:
                value = unpermute_rotary(value, h)
        yield name, value
        del value
        _drop_pages(reader, int(t.data_offset), int(t.n_bytes))
