"""Stop strings and EOS: the text ends right before the stop string, whatever token boundaries it straddles."""

from __future__ import annotations

import pytest

from tests.engine_helpers import greedy, make_engine


@pytest.fixture(scope="module")
def engine(demo_gguf):
    return make_engine(demo_gguf, kv_cache_memory_gb=0.05)


def run_text(engine, ids, sp):
    engine.add_request("r", ids, sp)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return "".join(o.text for o in outs), outs[-1]


def test_stop_string_cuts_the_text_and_finishes(engine):
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    full, last = run_text(engine, ids, greedy(60))
    assert last.finish_reason == "length"
    # a stop string that straddles several tokens, taken from the middle of the greedy text
    start = len(full) // 2
    stop = full[start : start + 5]
    assert stop.strip() and full.find(stop) == start, (full, stop)
    text, last = run_text(engine, ids, greedy(60, stop=[stop, "never-appears-here"]))
    assert last.finish_reason == "stop"
    assert text == full[:start]
    assert engine.kv.num_used_blocks == 0


def test_eos_stops_unless_ignored(engine):
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    _, last = run_text(engine, ids, greedy(200, ignore_eos=False))
    assert last.finish_reason == "stop" and last.num_output_tokens < 200
    _, last = run_text(engine, ids, greedy(last.num_output_tokens + 5, ignore_eos=True))
    assert last.finish_reason == "length"
