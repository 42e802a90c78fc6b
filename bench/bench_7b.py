"""4-bit decode of a Mistral-7B-shaped model: airun against llama.cpp on the same Q4_0 GGUF, and the bandwidth bound.

Builds (once, into the cache, never the repository) a GGUF with Mistral-7B-Instruct-v0.2's real config and tokenizer
and random weights, every matrix stored as Q4_0 (llama.cpp's ``--pure`` Q4_0: the output matrix too), then in one run:

- airun (``bench/airun_worker.py``) and llama.cpp (``bench/llamacpp_worker.py``, in its own venv) on the same token
  ids: greedy decode of ``--max-tokens`` tokens from a 32-token prompt, 2 threads, one after the other, ``--rounds``
  times;
- the bound, right before and after each engine (this host's bandwidth drifts by tens of percent over minutes): bytes
  read per second by a large copy (the issue's definition), and, stricter, bytes per second of a large read-only
  reduction, each divided by the bytes of weights a decode step reads (every matrix but the token embedding, whose
  rows are looked up).

    python bench/bench_7b.py [--threads 2] [--max-tokens 64] [--llamacpp-python PATH]

The bar (issue: quantized weights and CPU speed): airun >= 1.0x llama.cpp, and >= 70% of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_child  # noqa: E402
from bench.memory_7b import CONFIG, tensor_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Q4_0_BLOCK, Q4_0_BYTES = 32, 18


def default_path() -> Path:
    from airun.loader.demo import default_cache_dir

    return default_cache_dir() / "bench" / "mistral-7b-shaped-random-q4_0.gguf"


def gguf_tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """llama.cpp's tensor names and [rows, cols] (HF orientation) of the Mistral-7B config."""
    from tests.fixtures_models import gguf_name_of

    return [(gguf_name_of(name), shape) for name, shape in tensor_shapes()]


def random_q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw Q4_0 bytes: per block of 32, a float16 scale (|d| about 0.002, weights up to ~0.016) and 16 code bytes."""
    blocks = rows * cols // Q4_0_BLOCK
    raw = np.empty((blocks, Q4_0_BYTES), dtype=np.uint8)
    raw[:, :2] = (0.002 * (0.5 + rng.random(blocks, dtype=np.float32))).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return raw.reshape(rows, cols // Q4_0_BLOCK * Q4_0_BYTES)


def build_gguf(path: Path) -> None:
    """Writes the Q4_0 GGUF (~4 GB) with Mistral's SentencePiece vocabulary, once."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from tests.fixtures_text import mistral_spm_model_path

    if path.is_file():
        return
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    pieces = SentencePieceExtractor(str(mistral_spm_model_path())).proto.pieces
    c = CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("mistral-7b-shaped random Q4_0")
    w.add_uint32("llama.block_count", c["num_hidden_layers"])
    w.add_uint32("llama.context_length", c["max_position_embeddings"])
    w.add_uint32("llama.embedding_length", c["hidden_size"])
    w.add_uint32("llama.feed_forward_length", c["intermediate_size"])
    w.add_uint32("llama.attention.head_count", c["num_attention_heads"])
    w.add_uint32("llama.attention.head_count_kv", c["num_key_value_heads"])
    w.add_float32("llama.rope.freq_base", c["rope_theta"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    w.add_uint32("llama.rope.dimension_count", c["head_dim"])
    w.add_uint32("general.file_type", 2)  # MOSTLY_Q4_0
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_token_list([p.piece for p in pieces])
    w.add_array("tokenizer.ggml.scores", [float(p.score) for p in pieces])
    w.add_array("tokenizer.ggml.token_type", [int(p.type) for p in pieces])
    w.add_uint32("tokenizer.ggml.bos_token_id", c["bos_token_id"])
    w.add_uint32("tokenizer.ggml.eos_token_id", c["eos_token_id"])
    rng = np.random.default_rng(0)
    for name, shape in gguf_tensor_shapes():
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            w.add_tensor(name, random_q4_0(*shape, rng), raw_dtype=Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)


def bytes_per_token() -> int:
    """Bytes of weights one decode step reads: every matrix but the embedding (Q4_0: 18 bytes per 32 weights)."""
    mats = [(n, s) for n, s in gguf_tensor_shapes() if len(s) == 2 and n != "token_embd.weight"]
    return sum(rows * cols // Q4_0_BLOCK * Q4_0_BYTES for _, (rows, cols) in mats)


def bandwidth(gib: int = 2, threads: int = 2) -> dict[str, float]:
    """GB/s of a large copy (bytes read + written) and of a read-only sum, best of 5, with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(gib << 28, dtype=torch.float32)  # gib GiB
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    best_copy = best_read = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        best_read = min(best_read, time.perf_counter() - t)
    return {"copy_gb_s": round(2 * nbytes / best_copy / 1e9, 1), "copy_read_gb_s": round(nbytes / best_copy / 1e9, 1),
            "read_gb_s": round(nbytes / best_read / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="airun then llama.cpp, this many times")
    ap.add_argument("--llamacpp-python", default=str(Path.home() / ".cache/airun/peers/llamacpp/bin/python"))
    a = ap.parse_args()
    path = a.gguf or default_path()
    t = time.time()
    build_gguf(path)
    print(f"model: {path} ({path.stat().st_size / 1e9:.2f} GB, ready in {time.time() - t:.0f} s)", file=sys.stderr)
    per_token = bytes_per_token()
    rng = np.random.default_rng(1)
    prompts = {"chat": [[1] + rng.integers(100, 30000, size=31).tolist()],
               "long": [1] + rng.integers(100, 30000, size=63).tolist()}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    common = ["--prompts", f.name, "--threads", str(a.threads), "--max-tokens", str(a.max_tokens), "--concurrency", "1"]
    env = {"PYTHONPATH": str(ROOT)}
    engines = {"airun": (None, "bench/airun_worker.py")}
    if Path(a.llamacpp_python).exists():
        engines["llama.cpp"] = (a.llamacpp_python, "bench/llamacpp_worker.py")
    print(f"weights read per token: {per_token / 1e9:.3f} GB")
    print("| round | engine | decode tok/s | weight GB/s | copy: bytes read GB/s around it | of that bound "
          "| read-only GB/s around it | of that bound | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for rnd in range(a.rounds):
        for name, (python, worker) in engines.items():
            # The host's memory bandwidth drifts (it is shared): measure it right before and after each engine.
            before = bandwidth(threads=a.threads)
            r = run_child([worker, "--model", str(path), *common], env=env, python=python, timeout=7200)
            after = bandwidth(threads=a.threads)
            read = max(before["read_gb_s"], after["read_gb_s"])  # the bound: the better of the two
            copy_read = max(before["copy_read_gb_s"], after["copy_read_gb_s"])
            tok = r["decode_tok_s"]
            got = tok * per_token / 1e9
            rows.append({"round": rnd, "engine": name, "bw_before": before, "bw_after": after, **r})
            print(f"| {rnd + 1} | {name} | {tok} | {got:.1f} | {copy_read} | {got / copy_read:.0%} | {read} | "
                  f"{got / read:.0%} | {r['peak_rss_mib']} |", flush=True)
    if "llama.cpp" in engines:
        for rnd in range(a.rounds):
            ours, theirs = (next(x for x in rows if x["round"] == rnd and x["engine"] == e) for e in engines)
            print(f"round {rnd + 1}: airun / llama.cpp decode {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x")
    print(json.dumps({"bytes_per_token": per_token, "runs": rows}))


if __name__ == "__main__":
    main()
