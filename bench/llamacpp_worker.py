"""One llama.cpp measurement run (through llama-cpp-python's C API bindings), in its own process and interpreter;
prints one JSON line. Used by bench_peers.py, which passes the prompts as token ids (the same ids airun runs).

Runs in a virtual environment that has ``llama-cpp-python`` (it imports nothing from airun; only the standard-library ``bench/common.py``):

    python bench/llamacpp_worker.py --model demo.gguf --prompts prompts.json --threads 2

Greedy decoding with end-of-sequence never chosen (as ``ignore_eos`` in airun), several sequences in one batch per
step (llama.cpp's own continuous batching API: one ``llama_decode`` per step over every running sequence).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import llama_cpp as ll
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import measure  # noqa: E402  (standard library only)


class Runner:
    """A llama.cpp model and a context of ``n_ctx`` KV cells shared by up to ``n_seq`` sequences (a unified KV cache,
    sized to the largest run, as airun's pool is sized by a budget rather than per sequence)."""

    def __init__(self, path: str, threads: int, n_seq: int, n_ctx: int, n_batch: int) -> None:
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        load = getattr(ll, "llama_model_load_from_file", None) or ll.llama_load_model_from_file
        self.model = load(path.encode(), mp)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.kv_unified = True
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_batch, 512)
        cp.n_seq_max = n_seq
        cp.n_threads = threads
        cp.n_threads_batch = threads
        init = getattr(ll, "llama_init_from_model", None) or ll.llama_new_context_with_model
        self.ctx = init(self.model, cp)
        vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(vocab)
        self.eos = ll.llama_vocab_eos(vocab)
        self.n_batch = n_batch
        self.batch = ll.llama_batch_init(n_batch, 0, n_seq)

    def clear(self) -> None:
        if hasattr(ll, "llama_memory_clear"):
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        else:
            ll.llama_kv_self_clear(self.ctx)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """``items``: (token, position, sequence, wants logits), at most ``n_batch``; returns the greedy next token of
        each item that wants logits, in order."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        if ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, (_, _, _, logits) in enumerate(items):
            if logits:
                ptr = ll.llama_get_logits_ith(self.ctx, i)
                row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
                row = row.copy()
                row[self.eos] = -np.inf
                out.append(int(row.argmax()))
        return out

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, float]:
        """Prefills every prompt (chunks of ``n_batch`` tokens), then decodes all sequences together, one token each
        per step; returns (seconds, generated tokens, mean time to first token)."""
        self.clear()
        t0 = time.perf_counter()
        pending = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        nxt: list[int] = []
        for i in range(0, len(pending), self.n_batch):
            nxt += self.decode(pending[i : i + self.n_batch])
        ttft = time.perf_counter() - t0
        n = len(nxt)
        pos = [len(p) for p in prompts]
        for _ in range(max_tokens - 1):
            nxt = self.decode([(t, pos[s], s, True) for s, t in enumerate(nxt)])
            pos = [x + 1 for x in pos]
            n += len(nxt)
        return time.perf_counter() - t0, n, ttft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON: {chat: [[ids]...], long: [ids]}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32")
    a = ap.parse_args()
    data = json.load(open(a.prompts))
    conc = [int(x) for x in a.concurrency.split(",")]
    per_seq = max(len(p) for p in data["chat"]) + a.max_tokens + 16
    n_ctx = max(max(conc) * per_seq, len(data["long"]) + a.max_tokens + 16)
    t = time.perf_counter()
    r = Runner(a.model, a.threads, max(conc), n_ctx, n_batch=2048)
    res: dict = {"engine": "llama.cpp", "version": ll.__version__, "load_s": round(time.perf_counter() - t, 2)}
    res |= measure(r.generate, data, a.max_tokens, conc)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
