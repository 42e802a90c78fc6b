"""GGUF weights kept quantized: exact int4 repacking of Q4_0 / Q4_1 / Q4_K against ``gguf.quants.dequantize``, the
error of every requantization against the format's own rounding error, the header reader, and a mixed-type GGUF model
loaded with its native precision classes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from airun.engine.kv_manager import KVCacheManager
from airun.engine.model_runner import ModelRunner
from airun.layers.packed import PackedLinear, packing_supported
from airun.layers.quant import Int4Linear, quantize_int4, quantize_int8
from airun.loader import iter_weights, load_model_config, resolve_source
from airun.loader.gguf_quant import read_tensor_types, repack_int4, tensor_formats
from airun.model.llama import build_model
from airun.model.quantize import INT4_MODULES, INT8_MODULES, resolve_quant_plan
from tests.fixtures_models import random_quant_blocks, write_llama_gguf
from tests.quant_helpers import prompt_logits

ROWS, COLS = 48, 512
BLOCK_BYTES = {q: gguf.GGML_QUANT_SIZES[q] for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)}


def blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """Raw bytes of a ``qtype`` tensor with values of about ``std``: quantized from Gaussian floats where ``gguf`` can
    quantize the type, else random codes and scales with the super-block scale(s) shrunk to that magnitude."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0):
        return gguf.quants.quantize((std * rng.standard_normal((rows, cols))).astype(np.float32), qtype)
    raw = random_quant_blocks(qtype, rows, cols, rng).reshape(-1, BLOCK_BYTES[qtype][1])
    where = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q6_K: slice(BLOCK_BYTES[Q.Q6_K][1] - 2, None)}[qtype]
    d = raw[:, where].copy().view(np.float16).astype(np.float32)
    shrink = {Q.Q4_K: 200.0, Q.Q5_K: 400.0, Q.Q6_K: 200.0}[qtype] * 0.05 / std
    raw[:, where] = (d / shrink).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def own_step(qtype: Q, raw: np.ndarray) -> np.ndarray:
    """The quantization step of every element ``[rows, cols]`` in the format itself (ggml block layouts)."""
    size = BLOCK_BYTES[qtype][1]
    b = raw.reshape(-1, size)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):  # d per 32
        return np.repeat(b[:, :2].copy().view(np.float16).astype(np.float64), 32, axis=1).reshape(raw.shape[0], -1)
    if qtype == Q.Q6_K:  # d (last 2 bytes) * int8 scale per 16
        d = b[:, -2:].copy().view(np.float16).astype(np.float64)
        sc = b[:, 192:208].view(np.int8).astype(np.float64)
        return np.repeat(np.abs(d * sc), 16, axis=1).reshape(raw.shape[0], -1)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d * 6-bit scale per 32
        d = b[:, :2].copy().view(np.float16).astype(np.float64)
        sc, _ = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
        return np.repeat(d * sc.astype(np.float64), 32, axis=1).reshape(raw.shape[0], -1)
    raise ValueError(qtype)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_4bit_types_repack_exactly(qtype: Q) -> None:
    raw = blocks(qtype, ROWS, COLS, np.random.default_rng(int(qtype)))
    w = repack_int4(torch.from_numpy(raw), int(qtype), COLS)
    ref = gguf.quants.dequantize(raw, qtype)
    assert w.group_size == 32 and int(w.codes.max()) <= 15
    assert np.array_equal(w.dequantize().numpy(), ref)  # bit for bit


def test_q4_1_matmul_equals_float_matmul_up_to_bf16_scales() -> None:
    """The kernel computes with (d, m + 8d) rounded to bfloat16: rebuild that weight from the block bytes alone."""
    rng = np.random.default_rng(1)
    raw = blocks(Q.Q4_1, ROWS, COLS, rng)
    b = raw.reshape(ROWS, COLS // 32, 20)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float64)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float64)
    q = np.concatenate([b[..., 4:] & 15, b[..., 4:] >> 4], axis=-1).astype(np.float64)
    to_bf16 = lambda a: torch.from_numpy(a).bfloat16().double().numpy()  # noqa: E731
    w_kernel = ((q - 8) * to_bf16(d) + to_bf16(m + 8 * d)).reshape(ROWS, COLS)
    w_float = gguf.quants.dequantize(raw, Q.Q4_1).astype(np.float64)
    lin = Int4Linear(COLS, ROWS, 32)
    lin.load(repack_int4(torch.from_numpy(raw), int(Q.Q4_1), COLS))
    x = torch.randn(100, COLS, generator=torch.Generator().manual_seed(0))  # > kernel rows: the float32 path
    y = lin(x).double().numpy()
    np.testing.assert_allclose(y, x.double().numpy() @ w_kernel.T, rtol=1e-4, atol=1e-5)
    rel = np.abs(y - x.double().numpy() @ w_float.T).max() / np.abs(x.double().numpy() @ w_float.T).max()
    assert rel < 1e-2  # the bf16 scales' whole effect
    yk = lin(x[:3].bfloat16()).double().numpy()  # the bf16 kernel
    ref = x[:3].bfloat16().double().numpy() @ w_kernel.T
    assert np.abs(yk - ref).max() < 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", [Q.Q5_K, Q.Q6_K])
def test_k_quants_to_int8_add_less_error_than_the_format_has(qtype: Q) -> None:
    """5/6-bit K-quants become per-channel int8: its rounding error stays below the format's own rounding error
    (rms of step / sqrt(12) over all elements); a group-32 int4 layout would add more, so it is not used for them."""
    raw = blocks(qtype, ROWS, 1024, np.random.default_rng(int(qtype)))
    w = gguf.quants.dequantize(raw, qtype)
    own = rms(own_step(qtype, raw)) / np.sqrt(12)
    int8_err = rms(quantize_int8(torch.from_numpy(w)).dequantize().numpy() - w)
    int4_err = rms(quantize_int4(torch.from_numpy(w), 32).dequantize().numpy() - w)
    assert int8_err < own, (int8_err, own)
    assert int4_err > own, (int4_err, own)
    assert tensor_formats_of(qtype) == "int8"


def test_q8_0_to_per_channel_int8_error_is_of_the_order_of_its_own() -> None:
    """Block-32 scales become one scale per row: the step grows by max|row| / max|block| (~1.3-1.6x for Gaussian
    rows of 1024), so the requantization adds error of the order of Q8_0's own."""
    raw = blocks(Q.Q8_0, ROWS, 1024, np.random.default_rng(8))
    w = gguf.quants.dequantize(raw, Q.Q8_0)
    own = rms(own_step(Q.Q8_0, raw)) / np.sqrt(12)
    err = rms(quantize_int8(torch.from_numpy(w)).dequantize().numpy() - w)
    assert own < err < 2.5 * own, (err, own)


def tensor_formats_of(qtype: Q) -> str | None:
    from airun.loader.gguf_quant import native_format

    return native_format(qtype)


def write_mixed(path: Path) -> Path:
    """A 2-layer GGUF: layer 0 mixes every native class (qkv: Q4_0 + Q4_K + Q6_K -> int8; o: Q4_1 -> int4; gate_up:
    Q4_K + Q4_0 -> int4; down: Q5_K -> int8), layer 1 is F16 (stays float), output Q6_K, embedding Q8_0."""
    hidden, heads, kv_heads, inter, vocab = 256, 4, 2, 512, 96
    rng = np.random.default_rng(11)
    spec = {
        "token_embd.weight": ((vocab, hidden), Q.Q8_0),
        "blk.0.attn_q.weight": ((hidden, hidden), Q.Q4_0),
        "blk.0.attn_k.weight": ((kv_heads * 64, hidden), Q.Q4_K),
        "blk.0.attn_v.weight": ((kv_heads * 64, hidden), Q.Q6_K),
        "blk.0.attn_output.weight": ((hidden, hidden), Q.Q4_1),
        "blk.0.ffn_gate.weight": ((inter, hidden), Q.Q4_K),
        "blk.0.ffn_up.weight": ((inter, hidden), Q.Q4_0),
        "blk.0.ffn_down.weight": ((hidden, inter), Q.Q5_K),
        "output.weight": ((vocab, hidden), Q.Q6_K),
    }
    tensors = [(n, blocks(q, r, c, rng), q) for n, ((r, c), q) in spec.items()]
    for name, (r, c) in {"attn_q": (hidden, hidden), "attn_k": (128, hidden), "attn_v": (128, hidden),
                         "attn_output": (hidden, hidden), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
                         "ffn_down": (hidden, inter)}.items():
        tensors.append((f"blk.1.{name}.weight", (0.05 * rng.standard_normal((r, c))).astype(np.float16), None))
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight",
                 "output_norm.weight"):
        tensors.append((norm, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), None))
    return write_llama_gguf(path, vocab_size=vocab, hidden=hidden, layers=2, heads=heads, kv_heads=kv_heads,
                            intermediate=inter, tensors=tensors)


def test_header_reader_matches_gguf_reader(tmp_path: Path, demo_gguf: Path) -> None:
    for path in (write_mixed(tmp_path / "mixed.gguf"), demo_gguf):
        reader = gguf.GGUFReader(path)
        assert read_tensor_types(path) == {t.name: (int(t.tensor_type), len(t.shape)) for t in reader.tensors}


def test_mixed_gguf_keeps_native_precision_classes(tmp_path: Path) -> None:
    source = resolve_source(str(write_mixed(tmp_path / "mixed.gguf")))
    cfg = load_model_config(source)
    assert resolve_quant_plan(None, source, cfg, torch.float32) is None  # float32: dequantized as before
    assert resolve_quant_plan("none", source, cfg, torch.bfloat16) is None
    plan = resolve_quant_plan(None, source, cfg, torch.bfloat16)
    assert plan is not None and plan.native_gguf
    assert plan.formats == {
        "model.layers.0.self_attn.qkv_proj": "int8",
        "model.layers.0.self_attn.o_proj": "int4",
        "model.layers.0.mlp.gate_up_proj": "int4",
        "model.layers.0.mlp.down_proj": "int8",
        "lm_head": "int8",
    }
    dev = torch.device("cpu")
    ref = build_model(cfg, iter_weights(source, cfg), torch.float32, dev, 256)
    quant = build_model(cfg, iter_weights(source, cfg, native_quant=True), torch.bfloat16, dev, 256, quant=plan)
    layer0, layer1 = quant.model.layers
    assert isinstance(layer0.self_attn.qkv_proj, INT8_MODULES) and isinstance(layer0.mlp.down_proj, INT8_MODULES)
    assert isinstance(layer0.self_attn.o_proj, INT4_MODULES) and isinstance(layer0.mlp.gate_up_proj, INT4_MODULES)
    dense = PackedLinear if packing_supported(dev, torch.bfloat16) else torch.nn.Linear  # bf16 floats: oneDNN-packed
    assert type(layer1.mlp.gate_up_proj) is dense and isinstance(quant.lm_head, INT8_MODULES)
    # Exactly repacked modules differ from the float model only by the bf16 scales; requantized ones by int8 steps.
    for path in plan.formats:
        got = quant.get_submodule(path).dequantize(torch.float64)
        want = ref.get_submodule(path).weight.double()
        assert (got - want).abs().max() <= 2e-2 * want.abs().max(), path
    ids = [int(i) for i in torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))]
    logits = {}
    for name, model, dtype in (("ref", ref, torch.float32), ("quant", quant, torch.bfloat16)):
        runner = ModelRunner(model, 8, 16, dtype, dev)
        logits[name] = prompt_logits(runner, KVCacheManager(8, 16), ids, chunk=16)
    err = (logits["quant"] - logits["ref"]).abs().max() / logits["ref"].abs().max()
    assert err < 5e-2, err
