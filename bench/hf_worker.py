"""HF transformers ``generate()`` on the same weights, in its own process; prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import long_prompt_text, peak_rss_mib, topics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(a.gguf)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=getattr(torch, a.dtype)).eval()
    load_s = time.perf_counter() - t
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    def gen(texts: list[str], n: int, raw_ids: list[int] | None = None) -> float:
        if raw_ids is not None:
            enc = {"input_ids": torch.tensor([raw_ids]), "attention_mask": torch.ones(1, len(raw_ids), dtype=torch.long)}
        else:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0

    gen([chat("Hello")], 8)
    res: dict = {"engine": "transformers", "dtype": a.dtype, "load_s": round(load_s, 2)}
    secs = gen([chat(topics(1)[0])], a.max_tokens)
    res["decode_tok_s"] = round(a.max_tokens / secs, 1)
    ids = tok(long_prompt_text(), add_special_tokens=False)["input_ids"][:1000]
    secs = gen([], 1, raw_ids=ids)
    res["prefill_tokens"] = len(ids)
    res["prefill_tok_s"] = round(len(ids) / secs, 1)
    for c in [int(x) for x in a.concurrency.split(",")]:
        secs = gen([chat(q) for q in topics(c)], a.max_tokens)
        res[f"agg_tok_s_{c}"] = round(c * a.max_tokens / secs, 1)
    res["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
