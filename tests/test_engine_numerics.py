"""airun's float32 logits and greedy tokens against transformers on tiny random Mistrals with the real tokenizer: head
dim 8 (PyTorch's attention and rotary code) and head dim 32 (airun's native decode attention and fused rotary/cache
write, where :mod:`airun.native` is available)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine_helpers import LogitsRecorder, greedy, make_engine, run_all

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of",
    "Once upon a time, in a land far, far away, there lived a king who had three daughters and a very old dragon.",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module", params=[8, 32], ids=["head_dim8", "head_dim32"])
def tiny_mistral_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 query heads, 2 KV heads, 2 layers, rope_theta 1e6, no sliding window, with Mistral's tokenizer."""
    from tests.fixtures_models import make_tiny_mistral
    from tests.fixtures_text import make_mistral_tokenizer_dir

    d = make_tiny_mistral(tmp_path_factory.mktemp(f"numerics-{request.param}"), hidden=8 * request.param,
                          intermediate=16 * request.param)
    make_mistral_tokenizer_dir(d)
    return d


@pytest.fixture(scope="module")
def hf_model(tiny_mistral_dir: Path):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(tiny_mistral_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tiny_mistral_dir: Path) -> list[list[int]]:
    from airun.text.tokenizer import load_tokenizer_from_folder

    tok = load_tokenizer_from_folder(tiny_mistral_dir)
    return [tok.encode(p) for p in PROMPTS]


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def test_logits_match_transformers_at_prefill_and_every_decode_step(tiny_mistral_dir, hf_model, prompt_ids):
    engine = make_engine(tiny_mistral_dir, block_size=4, max_num_batched_tokens=16)  # forces chunked prefill
    rec = LogitsRecorder(engine)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(str(i), ids, greedy(8))
    tokens: dict[str, list[int]] = {str(i): list(ids) for i, ids in enumerate(prompt_ids)}
    worst = 0.0
    checked = 0
    while engine.has_unfinished():
        n_before = len(rec.steps)
        outs = engine.step()
        if not outs:
            continue
        assert len(rec.steps) == n_before + 1
        logits = rec.steps[-1]
        assert logits.shape[0] == len(outs)
        for row, o in zip(logits, outs):
            with torch.no_grad():
                ref = hf_model(torch.tensor([tokens[o.request_id]])).logits[0, -1]
            worst = max(worst, (ref - row).abs().max().item())
            checked += 1
            tokens[o.request_id].extend(o.token_ids)
    rec.close()
    assert checked == 8 * len(prompt_ids)
    assert worst <= 1e-4, worst


def test_greedy_batch_of_different_lengths_is_token_identical(tiny_mistral_dir, hf_model, prompt_ids):
    engine = make_engine(tiny_mistral_dir)
    got = run_all(engine, {str(i): (ids, greedy(40)) for i, ids in enumerate(prompt_ids)})
    for i, ids in enumerate(prompt_ids):
        assert got[str(i)] == hf_greedy(hf_model, ids, 40)
    assert engine.kv.num_used_blocks == 0


def test_preemption_and_recompute_keep_greedy_output(tiny_mistral_dir, hf_model, prompt_ids):
    # 12 blocks of 4 tokens (48 tokens, also the context cap) cannot hold four sequences growing by 16 at once.
    head_dim = hf_model.config.head_dim
    engine = make_engine(tiny_mistral_dir, block_size=4, kv_cache_memory_gb=12 * 2 * 2 * 4 * 2 * head_dim * 4 / 2**30)
    assert engine.kv.num_blocks == 12
    assert engine.max_model_len == 48
    got = run_all(engine, {str(i): (ids, greedy(16)) for i, ids in enumerate(prompt_ids)})
    assert engine.scheduler.num_preemptions > 0
    for i, ids in enumerate(prompt_ids):
        assert got[str(i)] == hf_greedy(hf_model, ids, 16)
    assert engine.kv.num_used_blocks == 0


def test_prefix_cache_hit_gives_the_same_tokens(tiny_mistral_dir, hf_model, prompt_ids):
    engine = make_engine(tiny_mistral_dir, block_size=4)
    ids = prompt_ids[2]
    first = run_all(engine, {"a": (ids, greedy(32))})["a"]
    engine.add_request("b", ids, greedy(32))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].num_cached_tokens == (len(ids) - 1) // 4 * 4
    second = [t for o in outs for t in o.token_ids]
    assert first == second == hf_greedy(hf_model, ids, 32)
