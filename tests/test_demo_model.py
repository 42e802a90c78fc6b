"""The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file, and concurrency."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine_helpers import greedy, make_engine, run_all

QUESTIONS = [
    "I am planning a trip to Europe next spring and I would like to visit its great capitals. What is the capital of France?",
    "Write a short haiku about the sea at night, with the moon shining on the waves and a small boat far away.",
    "My daughter asked me a question I could not answer. Explain in two simple sentences why the sky is blue during the day.",
    "For a math exercise in school, list three prime numbers greater than 10 and explain briefly how you checked each one.",
]


@pytest.fixture(scope="module")
def engine(demo_gguf: Path):
    return make_engine(demo_gguf, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def hf_demo(demo_gguf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        demo_gguf.parent, gguf_file=demo_gguf.name, torch_dtype=torch.float32
    ).eval()


def chat_ids(engine, question: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def test_greedy_tokens_match_transformers_on_chat_prompts(engine, hf_demo):
    for q in QUESTIONS:
        ids = chat_ids(engine, q)
        assert len(ids) >= 48
        got = run_all(engine, {"r": (ids, greedy(24, ignore_eos=False))})["r"]
        with torch.no_grad():
            ref = hf_demo.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
        assert got == ref, q


def test_capital_of_france_mentions_paris(engine):
    engine.add_request("paris", chat_ids(engine, "What is the capital of France?"), greedy(40, ignore_eos=False))
    text = ""
    while engine.has_unfinished():
        text += "".join(o.text for o in engine.step())
    assert "Paris" in text


def test_sixteen_concurrent_requests_equal_their_solo_outputs_under_preemption(demo_gguf):
    solo_engine = make_engine(demo_gguf, kv_cache_memory_gb=0.25)
    prompts = [chat_ids(solo_engine, f"Count from {i} to {i + 3 * (i % 5) + 2}, then say a word about the number {i}.")
               for i in range(16)]
    raw = [solo_engine.tokenizer.encode("x " * (5 + 7 * i)) for i in range(0, 16, 4)]
    prompts = prompts[:12] + raw
    lens = [8 + 5 * (i % 6) for i in range(16)]
    solo = {str(i): run_all(solo_engine, {str(i): (p, greedy(n))})[str(i)] for i, (p, n) in enumerate(zip(prompts, lens))}
    # 40 blocks of 16 tokens: fewer than 16 sequences of ~50-90 tokens need, so running sequences get preempted.
    small = make_engine(demo_gguf, kv_cache_memory_gb=40 * 16 * 2 * 30 * 3 * 64 * 4 / 2**30, max_num_batched_tokens=256)
    assert small.kv.num_blocks == 40
    together = run_all(small, {str(i): (p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, lens))})
    assert small.scheduler.num_preemptions > 0
    assert together == solo
    assert small.kv.num_used_blocks == 0
