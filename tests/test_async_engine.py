"""The async engine: streaming deltas, abort by id and by walking away, errors before the first output."""

from __future__ import annotations

import asyncio

import pytest

from airun.engine.async_engine import AsyncEngine
from airun.errors import ContextLengthError, InvalidRequestError
from tests.engine_helpers import greedy, make_engine, run_all


@pytest.fixture(scope="module")
def llm(tiny_mistral_dir):
    return make_engine(tiny_mistral_dir, max_model_len=512)


async def _wait_idle(engine: AsyncEngine, timeout: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        st = await engine.call_in_engine(lambda e: e.stats())
        if st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_used == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {st}")


def test_stream_matches_the_synchronous_engine(llm):
    ids = [1, 415, 2936, 9060, 285, 1142]
    expected = run_all(llm, {"sync": (ids, greedy(20))})["sync"]

    async def main() -> list[int]:
        eng = AsyncEngine(llm)
        await eng.start()
        got: list[int] = []
        outs = [o async for o in eng.generate(ids, greedy(20))]
        for o in outs:
            got.extend(o.token_ids)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].num_output_tokens == 20 and outs[-1].num_prompt_tokens == len(ids)
        assert "".join(o.text for o in outs) == llm.tokenizer.decode(got)
        await eng.shutdown()
        return got

    assert asyncio.run(main()) == expected


def test_walking_away_and_abort_free_kv_blocks_at_once(llm):
    async def main() -> None:
        eng = AsyncEngine(llm)
        await eng.start()
        gen = eng.generate([1, 415, 2936], greedy(400))
        async for out in gen:
            if out.num_output_tokens >= 3:
                break
        await gen.aclose()
        await _wait_idle(eng)

        async def consume() -> list:
            return [o async for o in eng.generate([1, 415, 2936], greedy(400), request_id="victim")]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await eng.abort("victim")
        await asyncio.wait_for(_wait_idle(eng), 2)
        outs = await asyncio.wait_for(task, 1)
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert outs[-1].num_output_tokens < 400
        await eng.shutdown()

    asyncio.run(main())


def test_invalid_requests_raise_before_any_output(llm):
    async def main() -> None:
        eng = AsyncEngine(llm)
        await eng.start()
        with pytest.raises(InvalidRequestError):
            async for _ in eng.generate([], greedy(4)):
                pass
        with pytest.raises(ContextLengthError):
            async for _ in eng.generate([1] * 500, greedy(100)):
                pass
        outs = [o async for o in eng.generate([1, 415], greedy(3))]
        assert outs[-1].num_output_tokens == 3
        await eng.shutdown()

    asyncio.run(main())
