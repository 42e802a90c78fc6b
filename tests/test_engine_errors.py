"""Bad input gets a clear exception and the engine keeps serving."""

from __future__ import annotations

import pytest

from airun.errors import ContextLengthError, InvalidRequestError, ModelLoadError
from airun.sampling_params import SamplingParams
from tests.engine_helpers import greedy, make_engine, run_all


@pytest.fixture(scope="module")
def engine(tiny_mistral_dir):
    return make_engine(tiny_mistral_dir, max_model_len=256)


def test_empty_prompt(engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", [], greedy(4))


def test_prompt_longer_than_context(engine):
    with pytest.raises(ContextLengthError) as exc:
        engine.add_request("long", [1] * 300, greedy(4))
    assert exc.value.num_tokens == 304 and exc.value.limit == 256
    assert "304" in str(exc.value) and "256" in str(exc.value)


@pytest.mark.parametrize("n", [0, -3])
def test_max_tokens_not_positive(engine, n):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("m", [1, 2, 3], SamplingParams(max_tokens=n, temperature=0))


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        make_engine(tmp_path / "does-not-exist.gguf")


def test_engine_keeps_serving_after_bad_requests(engine):
    for bad in ([], [1] * 300):
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", bad, greedy(4))
    assert not engine.has_unfinished()
    out = run_all(engine, {"ok": ([1, 415, 2936, 9060], greedy(5))})
    assert len(out["ok"]) == 5


def test_sliding_window_config_is_refused_beyond_the_window(tmp_path):
    import json

    from tests.fixtures_models import make_tiny_mistral
    from tests.fixtures_text import make_mistral_tokenizer_dir

    make_tiny_mistral(tmp_path)
    make_mistral_tokenizer_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    eng = make_engine(tmp_path)
    assert eng.max_model_len == 64
    with pytest.raises(ContextLengthError, match="sliding window"):
        eng.add_request("w", [1] * 60, greedy(10))
    with pytest.raises(InvalidRequestError, match="sliding window"):
        make_engine(tmp_path, max_model_len=128)
