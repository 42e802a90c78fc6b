"""GGUF tensor decoding: every supported type read from a real GGUF file equals (a) ``gguf.quants.dequantize`` of the
bytes that were written, (b) a plain-Python decoder written from ggml's block layouts, in HF orientation; and a
mixed-type GGUF model loads exactly as transformers loads it."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from airun.loader import iter_weights, load_model_config, resolve_source
from airun.loader.gguf_io import open_gguf, tensor_to_torch
from tests.fixtures_models import random_quant_blocks, write_llama_gguf

ROWS, COLS = 3, 512  # non-square and not a multiple of the block count per row: catches transposes


def _f16(b: bytes) -> float:
    return float(np.frombuffer(b, dtype=np.float16)[0])


def _ref_block(qtype: Q, b: bytes) -> list[float]:
    """One block decoded element by element from ggml's block definitions (little-endian)."""
    if qtype == Q.Q8_0:  # d:f16, qs:int8[32]; y = d*q
        d = _f16(b[:2])
        return [d * q for q in struct.unpack("<32b", b[2:34])]
    if qtype in (Q.Q4_0, Q.Q4_1):  # Q4_0: d, qs[16]; y = d*(q-8). Q4_1: d, m, qs[16]; y = d*q + m
        d = _f16(b[:2])
        m = _f16(b[2:4]) if qtype == Q.Q4_1 else 0.0
        qs = b[4:20] if qtype == Q.Q4_1 else b[2:18]
        lo = [x & 0xF for x in qs]
        hi = [x >> 4 for x in qs]
        if qtype == Q.Q4_0:
            return [d * (q - 8) for q in lo + hi]
        return [d * q + m for q in lo + hi]
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin, scales[12] (6-bit scale/min per 32-block), [qh[32]], qs[128]
        d, dmin, sc = _f16(b[:2]), _f16(b[2:4]), b[4:16]

        def scale_min(j: int) -> tuple[int, int]:
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

        qh = b[16:48] if qtype == Q.Q5_K else bytes(32)
        qs = b[48:176] if qtype == Q.Q5_K else b[16:144]
        out: list[float] = []
        for chunk in range(4):  # 64 values: low nibbles (sub-block 2c), then high nibbles (sub-block 2c+1)
            for half in range(2):
                s, m = scale_min(2 * chunk + half)
                bit = 2 * chunk + half
                for ll in range(32):
                    q = (qs[32 * chunk + ll] >> (4 * half)) & 0xF
                    q += 16 if (qh[ll] >> bit) & 1 else 0
                    out.append(d * s * q - dmin * m)
        return out
    if qtype == Q.Q6_K:  # ql[128], qh[64], scales:int8[16], d; 6-bit q = 4 low bits | 2 high bits, minus 32
        ql, qh, d = b[:128], b[128:192], _f16(b[208:210])
        scales = struct.unpack("<16b", b[192:208])
        out = [0.0] * 256
        for n in range(2):
            L, H, S = ql[64 * n :], qh[32 * n :], scales[8 * n :]
            for ll in range(32):
                i = ll // 16
                q1 = ((L[ll] & 0xF) | ((H[ll] & 3) << 4)) - 32
                q2 = ((L[ll + 32] & 0xF) | (((H[ll] >> 2) & 3) << 4)) - 32
                q3 = ((L[ll] >> 4) | (((H[ll] >> 4) & 3) << 4)) - 32
                q4 = ((L[ll + 32] >> 4) | (((H[ll] >> 6) & 3) << 4)) - 32
                base = 128 * n
                out[base + ll] = d * S[i] * q1
                out[base + ll + 32] = d * S[i + 2] * q2
                out[base + ll + 64] = d * S[i + 4] * q3
                out[base + ll + 96] = d * S[i + 6] * q4
        return out
    raise AssertionError(qtype)


def _ref_dequant(qtype: Q, raw: np.ndarray) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    flat = raw.tobytes()
    values = [v for k in range(0, len(flat), size) for v in _ref_block(qtype, flat[k : k + size])]
    return np.array(values, dtype=np.float32).reshape(raw.shape[0], -1)


def _one_tensor_gguf(path: Path, data: np.ndarray, raw_dtype: Q | None) -> Path:
    return write_llama_gguf(
        path, vocab_size=8, hidden=COLS, layers=1, heads=8, kv_heads=8, intermediate=ROWS,
        tensors=[("blk.0.ffn_up.weight", data, raw_dtype)],
    )


QUANT_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QUANT_TYPES + [Q.Q5_0, Q.Q5_1, Q.BF16], ids=lambda q: q.name)
def test_quantized_tensor_equals_gguf_dequantize(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    raw = random_quant_blocks(qtype, ROWS, COLS, rng)
    reader = open_gguf(_one_tensor_gguf(tmp_path / "t.gguf", raw, qtype))
    (t,) = reader.tensors
    assert t.tensor_type == qtype
    got = tensor_to_torch(t)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert tuple(got.shape) == (ROWS, COLS) == tuple(expected.shape)
    assert torch.equal(got.float(), expected)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_quantized_tensor_equals_block_layout_reference(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(100 + int(qtype))
    raw = random_quant_blocks(qtype, ROWS, COLS, rng)
    (t,) = open_gguf(_one_tensor_gguf(tmp_path / "t.gguf", raw, qtype)).tensors
    got = tensor_to_torch(t)
    expected = torch.from_numpy(_ref_dequant(qtype, raw))
    assert got.dtype == torch.float32 and tuple(got.shape) == (ROWS, COLS)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # same products, float32 vs float64 rounding


def test_q4_0_hand_computed_block(tmp_path: Path) -> None:
    # one row of 32: d = 0.25, byte i = (i % 16) | (15 - i % 16) << 4 -> x[i] = 0.25*(i-8), x[16+i] = 0.25*(7-i)
    d = np.array([0.25], dtype=np.float16).view(np.uint8)
    qs = np.array([(i % 16) | ((15 - i % 16) << 4) for i in range(16)], dtype=np.uint8)
    raw = np.concatenate([d, qs]).reshape(1, 18)
    path = write_llama_gguf(
        tmp_path / "h.gguf", vocab_size=8, hidden=32, layers=1, heads=4, kv_heads=4, intermediate=1,
        tensors=[("blk.0.ffn_up.weight", raw, Q.Q4_0)],
    )
    (t,) = open_gguf(path).tensors
    expected = [0.25 * (i - 8) for i in range(16)] + [0.25 * (7 - i) for i in range(16)]
    assert tensor_to_torch(t).tolist() == [expected]


@pytest.mark.parametrize("raw_dtype", [None, "f16"])
def test_float_tensors_keep_values_and_orientation(tmp_path: Path, raw_dtype: str | None) -> None:
    data = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) / 7
    if raw_dtype == "f16":
        data = data.astype(np.float16)
    (t,) = open_gguf(_one_tensor_gguf(tmp_path / "t.gguf", data, None)).tensors
    got = tensor_to_torch(t)
    assert got.dtype == (torch.float16 if raw_dtype else torch.float32)
    assert torch.equal(got, torch.from_numpy(data))


def test_mixed_type_model_matches_transformers(tmp_path: Path) -> None:
    """A 1-layer GGUF whose tensors use every supported type loads exactly as transformers loads it
    (names, orientation, q/k un-permutation with grouped KV heads)."""
    from transformers import AutoModelForCausalLM

    hidden, heads, kv_heads, inter, vocab = 256, 4, 2, 512, 64
    rng = np.random.default_rng(7)
    shapes = {  # HF orientation [out, in]; K-quants need in % 256 == 0
        "token_embd.weight": ((vocab, hidden), Q.Q8_0),
        "blk.0.attn_q.weight": ((hidden, hidden), Q.Q4_K),
        "blk.0.attn_k.weight": ((kv_heads * 64, hidden), Q.Q6_K),
        "blk.0.attn_v.weight": ((kv_heads * 64, hidden), Q.Q4_0),
        "blk.0.attn_output.weight": ((hidden, hidden), Q.Q4_1),
        "blk.0.ffn_gate.weight": ((inter, hidden), Q.Q5_K),
        "blk.0.ffn_up.weight": ((inter, hidden), Q.BF16),
        "blk.0.ffn_down.weight": ((hidden, inter), Q.Q6_K),
        "output.weight": ((vocab, hidden), Q.Q5_0),
    }
    tensors = [(n, random_quant_blocks(q, r, c, rng), q) for n, ((r, c), q) in shapes.items()]
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensors.append((norm, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), None))
    folder = tmp_path / "m"
    folder.mkdir()
    write_llama_gguf(
        folder / "mixed.gguf", vocab_size=vocab, hidden=hidden, layers=1, heads=heads, kv_heads=kv_heads,
        intermediate=inter, tensors=tensors,
    )
    source = resolve_source(str(folder / "mixed.gguf"))
    config = load_model_config(source)
    ours = dict(iter_weights(source, config, show_progress=False))

    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file="mixed.gguf", dtype=torch.float32).state_dict()
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor.float(), ref[name]), name
