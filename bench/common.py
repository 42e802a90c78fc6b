"""Shared pieces of the benchmark scripts: subprocess runs with peak-RSS capture, prompts, result tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
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
