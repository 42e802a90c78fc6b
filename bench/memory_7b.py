"""Load-time memory of a Mistral-7B-shaped checkpoint in bf16, int8 and int4.

Builds (once) a bf16 safetensors checkpoint with Mistral-7B-Instruct-v0.2's real shapes (hidden 4096, 32 layers,
32 heads, 8 KV heads, intermediate 14336, vocab 32000; random weights, ~14.5 GB) and its real tokenizer in a cache
folder (never in the repository), then loads it with the engine in a fresh process per mode and reports the peak
resident memory against the bytes of the weights the model holds plus the KV-cache budget.

Bar: bf16 peak RSS <= 1.1 x (weight bytes + KV budget). For int8 / int4 the weights are quantized tensor by tensor as
they stream from the file, so the peak stays near the quantized size: no full-precision copy of the model exists.

    python bench/memory_7b.py [--dir DIR] [--modes int4,int8,bf16] [--kv-gb 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_child  # noqa: E402

CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 1 << 30


def default_dir() -> Path:
    from airun.loader.demo import default_cache_dir

    return default_cache_dir() / "bench" / "mistral-7b-shaped-random-bf16"


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    c = CONFIG
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return out


def build_checkpoint(folder: Path) -> None:
    """Writes the checkpoint in ~1 GiB shards with an index, then the tokenizer; ``COMPLETE`` marks a finished one."""
    import torch
    from safetensors.torch import save_file

    from tests.fixtures_text import make_mistral_tokenizer_dir

    if (folder / "COMPLETE").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    t0 = time.time()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            else:
                tensors[name] = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    total = sum(2 * int(torch.tensor(s).prod()) for _, s in tensor_shapes())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    make_mistral_tokenizer_dir(folder)
    (folder / "COMPLETE").write_text("ok\n")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, folder: Path, kv_gb: float) -> None:
    """Loads the checkpoint with the engine in ``mode`` and prints one JSON line of measurements."""
    import torch

    from airun.engine.args import EngineArgs
    from airun.engine.llm_engine import LLMEngine
    from airun.engine.model_runner import kv_bytes_per_block
    from airun.model.quantize import quantized_bytes
    from airun.sampling_params import SamplingParams

    base = rss_mib()
    t0 = time.time()
    engine = LLMEngine(
        EngineArgs(
            model=str(folder), dtype="bfloat16", quantize=None if mode == "bf16" else mode, kv_cache_memory_gb=kv_gb,
            max_model_len=2048, show_progress=False, enable_prefix_caching=False,
        )
    )
    load_s = time.time() - t0
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = quantized_bytes(engine.model)
    num_blocks = engine.runner.k_caches[0].shape[0]
    kv_bytes = num_blocks * kv_bytes_per_block(engine.model, engine.args.block_size, engine.dtype)
    # one short request: the model runs (prefill of 8 tokens, 2 decode steps)
    t1 = time.time()
    engine.add_request("r", list(range(100, 108)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    gen_s = time.time() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "mode": mode, "load_s": round(load_s, 1), "gen_3_tokens_s": round(gen_s, 1), "threads": torch.get_num_threads(),
        "weight_bytes": weights, "kv_budget_bytes": kv_bytes, "baseline_rss_mib": round(base),
        "peak_rss_mib_after_load": round(peak_load), "peak_rss_mib": round(peak),
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--modes", default="int4,int8,bf16")
    ap.add_argument("--kv-gb", type=float, default=1.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    folder = ns.dir or default_dir()
    if ns.child:
        child(ns.child, folder, ns.kv_gb)
        return
    print(f"checkpoint: {folder}", file=sys.stderr)
    build_checkpoint(folder)
    rows = []
    for mode in ns.modes.split(","):
        print(f"loading in {mode}...", file=sys.stderr, flush=True)
        r = run_child([str(Path(__file__).resolve()), "--child", mode, "--dir", str(folder), "--kv-gb", str(ns.kv_gb)],
                      env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, timeout=7200)
        budget = (r["weight_bytes"] + r["kv_budget_bytes"]) / 2**20
        r["ratio_peak_to_weights_plus_kv"] = round(r["peak_rss_mib_after_load"] / budget, 3)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'mode':>5} {'weights GiB':>12} {'KV GiB':>7} {'peak RSS GiB':>13} {'peak/(w+KV)':>12} {'load s':>7}")
    for r in rows:
        print(f"{r['mode']:>5} {r['weight_bytes'] / 2**30:12.2f} {r['kv_budget_bytes'] / 2**30:7.2f} "
              f"{r['peak_rss_mib_after_load'] / 1024:13.2f} {r['ratio_peak_to_weights_plus_kv']:12.3f} "
              f"{r['load_s']:7.1f}")
    bf16 = [r for r in rows if r["mode"] == "bf16"]
    if bf16:
        ok = bf16[0]["ratio_peak_to_weights_plus_kv"] <= 1.1
        print(f"bar (bf16 peak RSS <= 1.1 x (weights + KV budget)): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
