"""airun's C++ CPU kernels (:mod:`airun.native`) against independent references: the ``gguf`` package's dequantization,
float64 matmuls, PyTorch's attention and elementwise ops, and (by running the engine numerics tests without them)
transformers through the PyTorch fallback paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from airun import native
from airun.layers import attention as attn
from airun.layers.int4_vnni import (
    KERNEL_MAX_ROWS,
    Int4VnniLinear,
    activation_levels,
    pack_codes,
    pack_weight,
    set_activation_levels,
    unpack_codes,
)
from airun.layers.int8_vnni import KERNEL_MAX_ROWS as INT8_KERNEL_MAX_ROWS
from airun.layers.int8_vnni import Int8VnniLinear
from airun.layers.quant import Int4Weight, Int8Weight, quantize_int4, quantize_int8
from airun.layers.rotary import RotaryEmbedding
from airun.loader.gguf_quant import repack_int4
from airun.model.llama import RMSNorm

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not native.cpu_has_flags(), reason="the kernels need AVX-512 VNNI")


@pytest.fixture(autouse=True)
def _loaded() -> None:
    assert native.available()  # loads torch.ops.airun_* (built once per source change)


def test_kernels_build_on_this_machine() -> None:
    """CI's machines have the instructions: a silent fallback to PyTorch's kernels would leave the rest untested."""
    assert native.available()


def test_pack_and_unpack_are_inverse() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 128), dtype=torch.uint8, generator=gen)
    packed = pack_codes(codes)
    assert packed.shape == (3, 4, 256)
    assert torch.equal(unpack_codes(packed), codes)
    # the documented layout: tile 0, block 0, j = 1, row 2, i = 3 holds codes (row 2, input 7) and (row 2, input 23)
    assert int(packed[0, 0, 1 * 64 + 2 * 4 + 3]) == int(codes[2, 7]) | (int(codes[2, 23]) << 4)
    # one stream per tile: block pairs of codes, then their float16 scales, then (with mins) their mins
    scales, mins = torch.rand(48, 4, generator=gen).half().float(), torch.rand(48, 4, generator=gen).half().float()
    qdata, asym = pack_weight(Int4Weight(codes, scales, mins, 32))
    assert asym and qdata.shape == (3, 2, 640)
    assert torch.equal(qdata[1, 1, :512].view(2, 256), packed[1, 2:4])
    assert torch.equal(qdata[1, 1, 512:576].view(torch.float16).view(2, 16), scales[16:32, 2:4].t().half())
    assert torch.equal(qdata[1, 1, 576:].view(torch.float16).view(2, 16), mins[16:32, 2:4].t().half())
    qdata, asym = pack_weight(Int4Weight(codes, scales, -8 * scales, 32))
    assert not asym and qdata.shape == (3, 2, 576)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_gguf_4bit_weights_dequantize_bit_for_bit(qtype: Q) -> None:
    """And the layer streams as many bytes as the file: 18 per 32 weights for Q4_0, 20 for Q4_1."""
    rows, cols = 64, 512
    floats = 0.05 * np.random.default_rng(int(qtype)).standard_normal((rows, cols))
    raw = gguf.quants.quantize(floats.astype(np.float32), qtype)
    lin = Int4VnniLinear(cols, rows, 32)
    lin.load(repack_int4(torch.from_numpy(raw), int(qtype), cols))
    assert lin.symmetric == (qtype == Q.Q4_0)  # Q4_0 stores no mins
    assert lin.qdata.numel() == raw.size
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(lin.dequantize(torch.float32).numpy(), ref)
    assert torch.equal(lin.dequantize(torch.bfloat16), torch.from_numpy(ref).bfloat16())


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_matches_float64_within_the_activation_levels(symmetric: bool) -> None:
    n, k, g = 96, 256, 64  # a group of 64 spans two kernel blocks
    gen = torch.Generator().manual_seed(1)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02).half().float()
    mins = -8 * scales if symmetric else ((torch.rand(n, k // g, generator=gen) - 0.5) * 0.2).half().float()
    w = Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen), scales, mins, g)
    lin = Int4VnniLinear(k, n, g)
    lin.load(w)
    assert lin.symmetric == symmetric
    w64 = w.dequantize().double()
    assert torch.equal(lin.dequantize(torch.float64), w64)  # float16 scales that were float16 already: exact
    for m in (1, 3, 4, 5, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1):
        x = torch.randn(m, k, generator=gen)
        x[0, :32] *= 100  # one block of large values: each block has its own levels
        ref = x.double() @ w64.t()
        y = lin(x)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        err = ((y.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max().item()
        # two int8 levels: error <= max|x| / 64516 per activation; the dense path (> KERNEL_MAX_ROWS) is float32
        assert err < (1e-4 if m <= KERNEL_MAX_ROWS else 1e-6), (m, err)
        yb = lin(x.bfloat16())
        refb = x.bfloat16().double() @ w64.t()
        assert yb.dtype == torch.bfloat16
        assert ((yb.double() - refb).abs() / refb.abs().amax(dim=1, keepdim=True)).max() < 1e-2
    assert lin(torch.randn(2, 3, k)).shape == (2, 3, n)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 activations as the kernels compute them: per block of 32, unit = max|x| / 127 (float32),
    code = round-half-even(x * (1 / unit)); returned dequantized (float64)."""
    blocks = x.float().reshape(-1, 32)
    unit = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(unit > 0, 1 / unit, torch.zeros_like(unit))
    return (torch.round(blocks * inv).clamp(-127, 127).double() * unit.double()).view(x.shape)


def test_one_int8_level_is_ggml_q8_0_and_errs_more() -> None:
    """With one level the kernel computes exactly ggml's Q8_0 activations times the weights (up to float32
    accumulation); two levels err ~100x less, and one is enough to flip the demo model's near-tied first answer token
    to "What is the capital of France?" (see test_perplexity), which is why one is used only under load."""
    k = 512
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    w = quantize_int4(torch.randn(64, k, generator=torch.Generator().manual_seed(3)) * 0.05, 32)
    lin = Int4VnniLinear(k, 64, 32)
    lin.load(w)
    wf = lin.dequantize(torch.float64)
    ref = x.double() @ wf.t()
    q8 = _q8_0(x) @ wf.t()
    set_activation_levels(1)
    try:
        y1 = lin(x).double()
    finally:
        set_activation_levels(2)
    assert (y1 - q8).abs().max() < 1e-5 * ref.abs().max()
    two = (lin(x).double() - ref).abs().max()
    one = (q8 - ref).abs().max()
    assert two * 30 < one
    with pytest.raises(ValueError):
        set_activation_levels(3)
    with pytest.raises(RuntimeError):
        torch.ops.airun_int4.linear(x, lin.qdata, lin.asym, 3)


def test_int8_layer_matches_float64_on_either_level() -> None:
    n, k = 96, 256
    gen = torch.Generator().manual_seed(4)
    w = quantize_int8(torch.randn(n, k, generator=gen) * 0.05)
    lin = Int8VnniLinear(k, n)
    lin.load_rows(0, Int8Weight(w.qweight[:40], w.scales[:40]))  # shards at any row offset, as fused modules load
    lin.load_rows(40, Int8Weight(w.qweight[40:], w.scales[40:]))
    assert torch.equal(lin.qweight, w.qweight)
    w64 = w.qweight.double() * w.scales.double()[:, None]
    assert torch.equal(lin.dequantize(torch.float64), w64)
    for m in (1, 5, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1):
        x = torch.randn(m, k, generator=gen)
        x[0, :32] *= 100  # one block of large values: each block has its own levels
        ref = x.double() @ w64.t()
        scale = ref.abs().amax(dim=1, keepdim=True)
        y = lin(x)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert ((y.double() - ref).abs() / scale).max() < (1e-4 if m <= INT8_KERNEL_MAX_ROWS else 1e-6), m
        if m <= INT8_KERNEL_MAX_ROWS:
            set_activation_levels(1)
            try:
                y1 = lin(x).double()
            finally:
                set_activation_levels(2)
            assert ((y1 - _q8_0(x) @ w64.t()).abs() / scale).max() < 1e-5, m
        yb = lin(x.bfloat16())
        refb = x.bfloat16().double() @ w64.t()
        assert yb.dtype == torch.bfloat16
        assert ((yb.double() - refb).abs() / refb.abs().amax(dim=1, keepdim=True)).max() < 1e-2
    lin.float_output = True  # as the head: float32 logits from bfloat16 activations, without their rounding
    for m in (3, INT8_KERNEL_MAX_ROWS + 1):
        xb = torch.randn(m, k, generator=gen).bfloat16()
        refb = xb.double() @ w64.t()
        yf = lin(xb)
        assert yf.dtype == torch.float32
        bound = 1e-4 if m <= INT8_KERNEL_MAX_ROWS else 1e-2  # above: a bfloat16 GEMM, then float32
        assert ((yf.double() - refb).abs() / refb.abs().amax(dim=1, keepdim=True)).max() < bound, m
    with pytest.raises(ValueError):
        Int8VnniLinear(64, 40)  # N not a multiple of 16
    with pytest.raises(ValueError):
        lin.load_rows(90, Int8Weight(w.qweight[:8], w.scales[:8]))  # past the last row


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        Int4VnniLinear(96, 64, 32)  # K not a multiple of 64 (whole block pairs)
    with pytest.raises(ValueError):
        Int4VnniLinear(64, 40, 32)  # N not a multiple of 16
    lin = Int4VnniLinear(64, 32, 32)
    with pytest.raises(ValueError):
        lin.load(quantize_int4(torch.randn(32, 64) * 1e6, 32))  # scales beyond float16
    with pytest.raises(RuntimeError):
        torch.ops.airun_int4.linear(torch.randn(2, 32), lin.qdata, True)  # K mismatch
    with pytest.raises(RuntimeError):
        torch.ops.airun_int4.linear(torch.randn(2, 64), lin.qdata, False)  # layout says mins, call says none


def _reference_decode(q, kc, vc, tables, ctx, scale):
    d, h = q.shape[-1], q.shape[1]
    kvh = kc.shape[2]
    nb = tables.shape[1]
    mask = (torch.arange(nb * kc.shape[1])[None, :] < ctx[:, None]).view(len(ctx), 1, 1, -1)
    kd = attn._gather_kv(kc.double(), tables, nb * kc.shape[1])
    vd = attn._gather_kv(vc.double(), tables, nb * kc.shape[1])
    return attn._attend(q.double().view(len(ctx), kvh, h // kvh, 1, d), kd, vd, mask, scale).reshape(len(ctx), h * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kvh,d", [(8, 2, 64), (9, 3, 64), (6, 1, 32), (4, 4, 128), (16, 2, 16), (10, 2, 256)])
def test_decode_attention_matches_masked_softmax_attention(dtype: torch.dtype, h: int, kvh: int, d: int) -> None:
    """Query heads per KV head 4, 3, 6 (head by head), 1, 8 and 5 (head by head), over head sizes 16 to 256."""
    gen = torch.Generator().manual_seed(4)
    blocks, bs = 40, 16
    kc = torch.randn(blocks, bs, kvh, d, generator=gen).to(dtype)
    vc = torch.randn(blocks, bs, kvh, d, generator=gen).to(dtype)
    ctx = torch.tensor([1, 17, 100, 33, 16])
    nb = (int(ctx.max()) + bs - 1) // bs
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:nb] for _ in ctx])
    q = torch.randn(len(ctx), h, d, generator=gen).to(dtype)
    out = torch.ops.airun_attn.decode(q, kc, vc, tables, ctx, 0.125)
    ref = _reference_decode(q, kc, vc, tables, ctx, 0.125)
    assert out.dtype == dtype and out.shape == (len(ctx), h * d)
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    with pytest.raises(RuntimeError):  # a context longer than the block table
        torch.ops.airun_attn.decode(q, kc, vc, tables, ctx + nb * bs, 0.125)


def test_decode_attention_without_avx512_bf16() -> None:
    """CPUs without AVX512-BF16 attend over bfloat16 caches with float32 multiply-adds; ``AIRUN_BF16_DOT=0`` makes this
    one take that path, and the bfloat16 cases above must hold there too."""
    env = dict(os.environ, AIRUN_BF16_DOT="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "dtype1",  # bfloat16
           "tests/test_native_kernels.py::test_decode_attention_matches_masked_softmax_attention"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 passed" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_equal_the_pytorch_code(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(576, generator=gen))
    norm = norm.to(dtype)
    x = torch.randn(7, 576, generator=gen).to(dtype)
    res = torch.randn(7, 576, generator=gen).to(dtype)
    want = norm._norm(x)
    want_res = res + x
    want_added = norm._norm(want_res)
    got = torch.ops.airun_fused.rms_norm(x, norm.weight, norm.eps)
    res_inplace = res.clone()
    got_added = torch.ops.airun_fused.add_rms_norm(x, res_inplace, norm.weight, norm.eps)
    assert torch.equal(res_inplace, want_res)  # the residual stream: bit for bit
    if dtype == torch.bfloat16:  # every rounding of transformers' bf16 RMSNorm reproduced
        assert torch.equal(got, want) and torch.equal(got_added, want_added)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got_added, want_added, rtol=2e-6, atol=2e-6)


def test_argmax_equals_torch_argmax_ties_and_nans_included() -> None:
    gen = torch.Generator().manual_seed(7)
    for shape in [(32, 49152), (1, 49152), (3, 17), (5, 1)]:
        x = torch.randn(*shape, generator=gen)
        assert torch.equal(torch.ops.airun_fused.argmax(x), x.argmax(dim=-1)), shape
        x = -x.abs() - 1  # all negative: a row's tail lanes must not count
        assert torch.equal(torch.ops.airun_fused.argmax(x), x.argmax(dim=-1)), shape
    x = torch.randn(4, 100, generator=gen)
    x[1, 50] = x[1, 70] = 1e9  # a tie: the first
    x[2, 30] = x[2, 10] = float("nan")  # NaNs count as the largest: the first
    x[3] = float("-inf")
    assert torch.ops.airun_fused.argmax(x).tolist() == x.argmax(dim=-1).tolist() == [int(x[0].argmax()), 50, 10, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [1536, 40, 7])
def test_fused_silu_mul_is_within_an_ulp_of_the_pytorch_code(dtype: torch.dtype, inter: int) -> None:
    """F.silu(gate) * up with its two roundings; the exp differs from PyTorch's by a few float32 ulp, which the
    rounding to bfloat16 almost always absorbs."""
    gate_up = (torch.randn(33, 2 * inter, generator=torch.Generator().manual_seed(6)) * 4).to(dtype)
    ref = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    got = torch.ops.airun_fused.silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == ref.shape
    ulp = ref.float().abs() * (2**-7 if dtype == torch.bfloat16 else 2**-23) + torch.finfo(torch.float32).tiny
    assert ((got.float() - ref.float()).abs() / ulp).max() <= (1 if dtype == torch.bfloat16 else 4)
    assert (got != ref).float().mean() < (0.01 if dtype == torch.bfloat16 else 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_and_cache_write_equal_the_pytorch_code(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    t, h, kvh, d = 5, 4, 2, 64
    rope = RotaryEmbedding(d, 4096, 1e6)
    rope.reset()
    positions = torch.tensor([0, 7, 100, 4095, 31])
    cos, sin = rope.lookup(positions, dtype)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(dtype)
    kc, vc = torch.zeros(4, 16, kvh, d, dtype=dtype), torch.zeros(4, 16, kvh, d, dtype=dtype)
    slots = torch.tensor([3, 17, 63, 0, 40])
    q, k = torch.ops.airun_fused.rope_kv(qkv, cos, sin, kc, vc, slots, h, kvh)
    q_ref = RotaryEmbedding.apply(qkv[:, : h * d].view(t, h, d), cos, sin)
    k_ref = RotaryEmbedding.apply(qkv[:, h * d : (h + kvh) * d].view(t, kvh, d), cos, sin)
    v_ref = qkv[:, (h + kvh) * d :].view(t, kvh, d)
    if dtype == torch.bfloat16:  # every rounding of the bf16 code reproduced
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    else:  # PyTorch's float32 kernels differ by an ulp here and there
        torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6)
    assert torch.equal(kc.view(-1, kvh, d)[slots], k) and torch.equal(vc.view(-1, kvh, d)[slots], v_ref)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not kc.view(-1, kvh, d)[untouched].any() and not vc.view(-1, kvh, d)[untouched].any()
    with pytest.raises(RuntimeError):
        torch.ops.airun_fused.rope_kv(qkv, cos, sin, kc, vc, slots + 64, h, kvh)  # a slot outside the cache


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_lora_op_adds_each_rows_adapter_update(wdtype: torch.dtype) -> None:
    """out[t, slice] += (x[t] @ A[slot]) [slice ranks] @ B[slot], rows of slot 0 and untargeted slices untouched."""
    gen = torch.Generator().manual_seed(7)
    slots, k, r, widths = 4, 64, 8, (48, 16, 16)
    a = torch.randn(slots, k, 3 * r, generator=gen).to(wdtype)
    a[0] = 0
    bs = [torch.randn(slots, r, w, generator=gen).to(wdtype) for w in widths]
    x = torch.randn(7, k, generator=gen).bfloat16()
    base = torch.randn(7, sum(widths), generator=gen).bfloat16()
    segments = [(2, 0, 3), (1, 4, 2), (3, 6, 1)]  # row 3 has no adapter
    out = base.clone()
    updated = [0, 2]  # slices 0 and 2 targeted, slice 1 not
    offsets = [0, 48 + 16]
    torch.ops.airun_lora.apply(out, x, a, [bs[i] for i in updated], updated, offsets,
                               [v for seg in segments for v in seg], r)
    want = base.double()
    for slot, first, n in segments:
        h = x[first : first + n].double() @ a[slot].double()
        for i, off in zip(updated, offsets):
            want[first : first + n, off : off + widths[i]] += h[:, i * r : (i + 1) * r] @ bs[i][slot].double()
    assert torch.equal(out[3], base[3]) and torch.equal(out[:, 48:64], base[:, 48:64])
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=5e-2)  # one bf16 rounding of each output


def test_engine_numerics_hold_without_the_native_kernels() -> None:
    """The PyTorch fallback of every native op, checked against transformers (and the LoRA layer against its
    reference) by the same tests."""
    env = dict(os.environ, AIRUN_NATIVE_KERNELS="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine_numerics.py",
           "tests/test_lora_layer.py"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_busy_steps_run_one_activation_level(tiny_mistral_dir: Path) -> None:
    """The runner quantizes activations to one level in steps of ``one_level_from`` sequences or more (head
    included), to two otherwise, and leaves two set after every step."""
    from airun.cli import build_parser, engine_args_from
    from tests.engine_helpers import greedy, make_engine, run_all

    assert engine_args_from(build_parser().parse_args(["generate", "hi"])).one_level_from == 16
    args = engine_args_from(build_parser().parse_args(["generate", "--one-level-from", "0", "hi"]))
    assert args.one_level_from is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--one-level-from", "-1", "hi"])
    engine = make_engine(tiny_mistral_dir, quantize="int4", dtype="bfloat16", one_level_from=3)
    assert isinstance(engine.model.lm_head, Int8VnniLinear)
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, Int4VnniLinear)
    seen: list[int] = []
    engine.model.lm_head.register_forward_hook(lambda *_: seen.append(activation_levels()))
    run_all(engine, {f"r{i}": ([1, 2 + i, 3], greedy(4)) for i in range(3)})
    assert len(seen) == 4 and set(seen) == {1}
    assert activation_levels() == 2
    seen.clear()
    run_all(engine, {"solo": ([1, 5, 6], greedy(4))})
    assert len(seen) == 4 and set(seen) == {2}


def test_fused_decoder_layer_equals_the_python_path_bit_for_bit(demo_gguf: Path) -> None:
    """Decode-only steps run each layer as one op (``airun_layer.decode``); logits and tokens equal those of the
    layer-by-layer Python path exactly, with two activation levels and with one."""
    from airun.model.llama import CausalLM
    from tests.engine_helpers import LogitsRecorder, greedy, make_engine, run_all

    engine = make_engine(demo_gguf, dtype="bfloat16", enable_prefix_caching=False, one_level_from=3)
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Name three colors.", "Count to five.")]
    used: list[bool] = []
    engine.model.register_forward_pre_hook(
        lambda m, args: used.append(m._fused_decode_args(m.model.embed_tokens(args[0]), args[2]) is not None))
    runs = []
    for fuse in (True, False):
        CausalLM.fuse_decode_layers = fuse
        try:
            for batch in ([prompts[0]], prompts):  # one sequence: two levels; three: one level
                rec = LogitsRecorder(engine)
                out = run_all(engine, {f"{fuse}{len(batch)}{i}": (ids, greedy(12)) for i, ids in enumerate(batch)})
                rec.close()
                runs.append((list(out.values()), rec.steps))
        finally:
            CausalLM.fuse_decode_layers = True
    assert any(used)  # the fused op ran (on the decode steps)
    for fused_run, python_run in zip(runs[:2], runs[2:]):
        assert fused_run[0] == python_run[0]
        assert len(fused_run[1]) == len(python_run[1])
        assert all(torch.equal(a, b) for a, b in zip(fused_run[1], python_run[1]))
    assert "Paris" in tok.decode(runs[0][0][0])


def test_short_prefill_chunks_attend_through_the_decode_kernel(tiny_mistral_dir: Path) -> None:
    """A prefill chunk ending within PREFILL_AS_DECODE_MAX_CTX positions gets one decode query per token (its context
    = position + 1, its sequence's block table); a longer one keeps PyTorch's SDPA. Both are checked against
    transformers by the numerics and perplexity tests."""
    from airun.engine.scheduler import ScheduledSeq
    from airun.engine.sequence import Sequence
    from airun.layers.attention import PREFILL_AS_DECODE_MAX_CTX
    from airun.sampling_params import SamplingParams
    from tests.engine_helpers import make_engine

    engine = make_engine(tiny_mistral_dir)
    seq = Sequence("s", list(range(3, 3 + PREFILL_AS_DECODE_MAX_CTX + 88)), SamplingParams(max_tokens=1))
    first = PREFILL_AS_DECODE_MAX_CTX - 12
    assert engine.kv.allocate_slots(seq, first)
    _, positions, meta, _ = engine.runner.prepare([ScheduledSeq(seq, first)])
    assert meta.prefill_token_ctx is not None and meta.prefill_token_tables is not None
    assert torch.equal(meta.prefill_token_ctx, positions + 1)
    blocks = -(-first // engine.runner.block_size)
    assert meta.prefill_token_tables.tolist() == [seq.block_table[:blocks]] * first
    seq.num_computed_tokens = first
    assert engine.kv.allocate_slots(seq, 100)
    _, _, meta, _ = engine.runner.prepare([ScheduledSeq(seq, 100)])  # ends past the threshold
    assert meta.prefill_token_ctx is None and meta.prefill_token_tables is None
