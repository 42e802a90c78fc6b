"""Shared pieces of the benchmark scripts: subprocess runs with peak-RSS capture, prompts, the measurement protocol
every engine worker runs, result tables. Standard library only: the peers' workers import it from their own venvs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# The figures every engine worker reports (JSON keys) and their table labels.
FIELDS = [
    ("decode_tok_s", "single-stream decode tok/s"),
    ("prefill_tok_s", "prefill tok/s (1,000-token prompt)"),
    ("agg_tok_s_1", "aggregate tok/s, 1 request"),
    ("agg_tok_s_8", "aggregate tok/s, 8 concurrent"),
    ("agg_tok_s_32", "aggregate tok/s, 32 concurrent"),
    ("peak_rss_mib", "peak RSS (MiB)"),
]


def long_prompt_text(n_words: int = 900) -> str:
    """A deterministic English-like text (about 1.1 tokens per word for BPE tokenizers)."""
    words = ("the river runs past old stone houses while children play near quiet gardens and the bakers "
             "open early to sell warm bread to travellers from distant towns").split()
    return " ".join(words[(i * 7) % len(words)] for i in range(n_words))


def run_child(args: list[str], env: dict[str, str] | None = None, timeout: float = 1800,
              python: str | None = None) -> dict:
    """Runs ``python args...`` (this interpreter unless ``python`` names another) in a fresh process; returns its last
    stdout line that is a JSON object (the child reports its own peak RSS)."""
    e = dict(os.environ)
    e.update(env or {})
    exe = python or sys.executable
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]  # peers may log to stdout after it
    if not lines:
        raise RuntimeError(f"{args} printed no JSON:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


Generate = Callable[[list[list[int]], int], tuple[float, int, float | None]]


def measure(generate: Generate, prompts: dict[str, list], max_tokens: int, levels: list[int]) -> dict[str, float]:
    """The engine benchmark's protocol, the same for every engine: ``generate(prompts, n)`` runs the prompts together
    to ``n`` tokens each and returns (seconds, generated tokens, time to first token or None). A warm-up, single-stream
    decode of ``prompts["chat"][0]``, prefill of ``prompts["long"]`` (time to its first token), then the first ``c``
    chat prompts together for each level ``c``; and the process's peak RSS."""
    generate([prompts["chat"][0][:8]], 8)  # warm-up
    res: dict[str, float] = {}
    secs, n, _ = generate([prompts["chat"][0]], max_tokens)
    res["decode_tok_s"] = round(n / secs, 1)
    secs, _, ttft = generate([prompts["long"]], 1)
    res["prefill_tokens"] = len(prompts["long"])
    res["prefill_tok_s"] = round(len(prompts["long"]) / (ttft if ttft is not None else secs), 1)
    for c in levels:
        secs, n, ttft = generate(prompts["chat"][:c], max_tokens)
        res[f"agg_tok_s_{c}"] = round(n / secs, 1)
        if ttft is not None:
            res[f"ttft_s_{c}"] = round(ttft, 3)
    res["peak_rss_mib"] = peak_rss_mib()
    return res


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def topics(n: int) -> list[str]:
    base = ["the sea", "a mountain", "a robot", "the moon", "a garden", "a train", "winter", "a city", "music",
            "a library", "the desert", "a river", "friendship", "a storm", "coffee", "a lighthouse"]
    return [f"Write a long story about {base[i % len(base)]} number {i}." for i in range(n)]


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}x"
