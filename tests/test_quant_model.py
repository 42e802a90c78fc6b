"""``--quantize int8|int4`` on a safetensors checkpoint, end to end through the engine: the stored integers equal a
round-to-nearest quantization written here from the format definitions (numpy), and the engine's logits equal
transformers' run of the same model with those quantized weights put back in float."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from airun.cli import build_parser, engine_args_from
from airun.errors import InvalidRequestError
from airun.sampling_params import SamplingParams
from airun.layers import quant
from airun.layers.int4_vnni import Int4VnniLinear
from airun.layers.int8_vnni import Int8VnniLinear
from airun.loader import iter_weights, load_model_config, resolve_source
from airun.model.llama import build_model
from airun.model.quantize import (
    INT4_MODULES,
    INT8_MODULES,
    linear_paths,
    plan_from_float,
    quantized_bytes,
    resolve_quant_plan,
)
from tests.engine_helpers import make_engine
from tests.quant_helpers import engine_logits

SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().double().numpy()


def ref_int8(w: np.ndarray, vnni: bool = False) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(codes, codes -> the weight the layer computes with): scale = max|row| / 127 (kept in bfloat16 for PyTorch's
    kernel, float32 for airun's VNNI kernel), q = round(w / scale)."""
    s = np.abs(w).max(axis=1, keepdims=True) / 127
    kept = s.astype(np.float32).astype(np.float64) if vnni else bf16(s)
    return np.round(w / s), lambda q: q * kept


def fp16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float64)


def ref_int4(w: np.ndarray, g: int, vnni: bool) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(codes, codes -> the weight the layer computes with): per group of g, scale = (max - min) / 15,
    q = round((w - min) / scale) in [0, 15]. PyTorch's kernel holds scale and zero = min + 8 scale in bfloat16 and
    computes (q - 8) scale + zero; airun's VNNI kernel holds scale and min in float16 and computes q scale + min."""
    n, k = w.shape
    x = w.reshape(n, k // g, g).astype(np.float64)
    lo, hi = x.min(axis=2, keepdims=True), x.max(axis=2, keepdims=True)
    s = (hi - lo) / 15
    q = np.clip(np.round((x - lo) / s), 0, 15).reshape(n, k)
    if vnni:
        return q, lambda c: (c.reshape(n, k // g, g) * fp16(s) + fp16(lo)).reshape(n, k)
    return q, lambda c: ((c.reshape(n, k // g, g) - 8) * bf16(s) + bf16(lo + 8 * s)).reshape(n, k)


def fused(state: dict[str, np.ndarray], path: str) -> np.ndarray:
    """The checkpoint weight of a module path (q/k/v and gate/up stacked by rows)."""
    if path == "lm_head":
        return state["lm_head.weight"]
    parent, _, attr = path.rpartition(".")
    return np.concatenate([state[f"{parent}.{s}.weight"] for s in SHARDS.get(attr, (attr,))])


@pytest.fixture(scope="module")
def reference(tiny_mistral_dir: Path):
    from transformers import AutoModelForCausalLM

    state = load_file(str(tiny_mistral_dir / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32).eval()
    return state, hf


def hf_logits_with(hf, replaced: dict[str, np.ndarray], ids: list[int]) -> torch.Tensor:
    """transformers' logits with some weights replaced (by HF name), the original weights restored after."""
    params = dict(hf.named_parameters())
    saved = {n: params[n].detach().clone() for n in replaced}
    try:
        with torch.no_grad():
            for n, w in replaced.items():
                params[n].copy_(torch.from_numpy(w))
            return hf(torch.tensor([ids])).logits[0].float()
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_safetensors_model_equals_transformers_with_quantized_weights(
    tiny_mistral_dir: Path, reference, fmt: str
) -> None:
    state, hf = reference
    engine = make_engine(tiny_mistral_dir, quantize=fmt, threads=1)
    model, cfg = engine.model, engine.model_config
    replaced: dict[str, np.ndarray] = {}
    for path in linear_paths(cfg):
        mod = model.get_submodule(path)
        w = fused(state, path).astype(np.float64)
        if path == "lm_head" or fmt == "int8":
            assert isinstance(mod, INT8_MODULES), path
            codes, weight_of = ref_int8(w, isinstance(mod, Int8VnniLinear))
            got = mod.qweight.numpy().astype(np.float64)
        else:
            assert isinstance(mod, INT4_MODULES) and mod.group_size == 32, path
            codes, weight_of = ref_int4(w, 32, isinstance(mod, Int4VnniLinear))
            if isinstance(mod, Int4VnniLinear):
                got = mod.codes().numpy().astype(np.float64)
            else:
                got = quant._unpack_cpu(mod.packed, *w.shape, quant.cpu_int4_layout()).numpy().astype(np.float64)
        # The same integers as round-to-nearest, but for rare near-ties that float rounding breaks the other way.
        assert np.abs(got - codes).max() <= 1 and np.mean(got == codes) > 0.999, path
        # Scales and zeros as defined: the layer's weight is the definition applied to its codes (up to a bfloat16
        # rounding that float32 and float64 arithmetic occasionally break differently).
        w_eff = weight_of(got)
        np.testing.assert_allclose(mod.dequantize(torch.float64).numpy(), w_eff, rtol=0, atol=np.abs(w).max() * 2**-9)
        if path == "lm_head":
            replaced["lm_head.weight"] = w_eff.astype(np.float32)
            continue
        parent, _, attr = path.rpartition(".")
        rows = 0
        for s in SHARDS.get(attr, (attr,)):
            n = state[f"{parent}.{s}.weight"].shape[0]
            replaced[f"{parent}.{s}.weight"] = w_eff[rows : rows + n].astype(np.float32)
            rows += n
    ids = [int(i) for i in torch.randint(3, cfg.vocab_size, (100,), generator=torch.Generator().manual_seed(5))]
    ref = hf_logits_with(hf, replaced, ids)
    # One chunk of 100 rows: the dequantize path, in float32 like the reference.
    big = engine_logits(engine, ids, chunk=100)
    assert (big - ref).abs().max() < 2e-4 * ref.abs().max(), (big - ref).abs().max()
    # Chunks of 8 rows: the kernels, in bfloat16 (PyTorch's) or on int8 activation levels (airun's VNNI kernel).
    small = engine_logits(engine, ids, chunk=8)
    assert (small - ref).abs().max() < 3e-2 * ref.abs().max(), (small - ref).abs().max()


def test_tied_embeddings_get_an_int8_head_and_keep_a_float_embedding(tmp_path: Path) -> None:
    from tests.fixtures_models import make_tiny_mistral
    from tests.fixtures_text import make_mistral_tokenizer_dir

    folder = make_tiny_mistral(tmp_path / "tied", tie=True, seed=3)
    make_mistral_tokenizer_dir(folder)
    engine = make_engine(folder, quantize="int4", threads=1)
    emb = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float64)
    model = engine.model
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight.double(), torch.from_numpy(emb))
    assert isinstance(model.lm_head, INT8_MODULES)
    codes, _ = ref_int8(emb)
    assert np.mean(model.lm_head.qweight.numpy() == codes) > 0.999
    assert not [n for n, _ in model.named_parameters() if "proj" in n or "lm_head" in n]


def test_quantized_weights_take_the_expected_bytes(tiny_mistral_dir: Path) -> None:
    source = resolve_source(str(tiny_mistral_dir))
    cfg = load_model_config(source)
    dev = torch.device("cpu")
    sizes = {}
    for fmt in ("int8", "int4"):
        model = build_model(cfg, iter_weights(source, cfg), torch.bfloat16, dev, 64, quant=plan_from_float(cfg, fmt))
        sizes[fmt] = quantized_bytes(model)
    row_scale = 4 if isinstance(model.lm_head, Int8VnniLinear) else 2  # float32 for airun's kernel, else bfloat16
    float_bytes = quantized_bytes(build_model(cfg, iter_weights(source, cfg), torch.bfloat16, dev, 64))
    q, kv, h, i = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size, \
        cfg.intermediate_size
    shapes = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)] * cfg.num_hidden_layers  # (out, in) of the projections
    head = (cfg.vocab_size, h)
    # bf16: 2 bytes a weight. int8: 1 byte + a scale per row. int4: 1/2 byte + 16-bit (scale, zero) per 32 inputs.
    bf16_b = sum(2 * o * k for o, k in shapes + [head])
    int8_b = sum(o * k + row_scale * o for o, k in shapes + [head])
    int4_b = sum(o * k // 2 + 4 * o * k // 32 for o, k in shapes) + head[0] * head[1] + row_scale * head[0]
    assert float_bytes - sizes["int8"] == bf16_b - int8_b
    assert float_bytes - sizes["int4"] == bf16_b - int4_b


def test_missing_shard_is_reported(tiny_mistral_dir: Path) -> None:
    source = resolve_source(str(tiny_mistral_dir))
    cfg = load_model_config(source)
    weights = ((n, t) for n, t in iter_weights(source, cfg) if n != "model.layers.1.self_attn.v_proj.weight")
    with pytest.raises(KeyError, match="qkv_proj"):
        build_model(cfg, weights, torch.float32, torch.device("cpu"), 64, quant=plan_from_float(cfg, "int4"))


def test_quantize_choices(tiny_mistral_dir: Path) -> None:
    source = resolve_source(str(tiny_mistral_dir))
    cfg = load_model_config(source)
    assert resolve_quant_plan(None, source, cfg, torch.bfloat16) is None  # safetensors stay float by default
    assert resolve_quant_plan("none", source, cfg, torch.bfloat16) is None
    plan = resolve_quant_plan("int4", source, cfg, torch.float32)
    assert plan is not None and not plan.native_gguf and plan.formats["lm_head"] == "int8"
    assert set(plan.formats.values()) == {"int4", "int8"}
    with pytest.raises(InvalidRequestError):
        resolve_quant_plan("int3", source, cfg, torch.bfloat16)
    args = engine_args_from(build_parser().parse_args(["generate", "--quantize", "int4", "hello"]))
    assert args.quantize == "int4"
    assert engine_args_from(build_parser().parse_args(["generate", "hello"])).quantize is None


def test_lora_adapters_wrap_quantized_projections(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    """A LoRA wrapper holds the quantized base as is: an adapter changes the output of a quantized model, and its
    per-row delta is computed in float on top of the int4 base."""
    from airun.layers.lora import LoRALinear
    from tests.lora_fixtures import make_peft_adapter

    adapter = make_peft_adapter(tiny_mistral_dir, tmp_path / "ad", seed=1)
    engine = make_engine(
        tiny_mistral_dir, quantize="int4", threads=1, enable_lora=True, lora_modules={"ad": str(adapter)}
    )
    qkv = engine.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and isinstance(qkv.base, INT4_MODULES)
    ids = [1, 330, 1526, 302, 4843, 349]
    outs = {}
    for key in (None, "ad"):
        engine.add_request(str(key), ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), cache_key=key)
        outs[key] = []
        while engine.has_unfinished():
            for o in engine.step():
                outs[key].extend(o.token_ids)
    assert len(outs[None]) == len(outs["ad"]) == 6 and outs[None] != outs["ad"]
