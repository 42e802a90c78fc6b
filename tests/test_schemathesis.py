"""Schema fuzzing: schemathesis generates requests from the server's own ``/openapi.json`` (Workers AI, OpenAI and
fine-tune routes) and sends them to a real server on the demo model (``max_tokens`` clamped to 2 so that each case is
fast). Every response must be no 5xx, have a documented status code and content type, and conform to the documented
schema. At least 500 cases in all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from airun.server.settings import ServerSettings
from tests.http_fixtures import LiveServer, live_server, small_engine_args

pytestmark = pytest.mark.slow
MIN_CASES = 500
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
seen: list[str] = []


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("fuzz-data")
    settings_ = ServerSettings(max_tokens_cap=2, max_waiting_requests=None)
    with live_server(small_engine_args(data_dir=str(data)), settings_) as s:
        yield s


def test_api_conforms(srv: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    budget = {op.label: -(-(MIN_CASES + 20) // len(operations)) for op in operations}
    for round_ in range(4):  # an operation with few distinct inputs gives fewer cases: the others make up for it
        if len(seen) >= MIN_CASES or not budget:
            break
        ran: dict[str, int] = {}
        for op in operations:
            if op.label not in budget:
                continue
            before = len(seen)

            @seed(round_)
            @given(case=op.as_strategy())
            @settings(max_examples=budget[op.label], deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case: schemathesis.Case) -> None:  # type: ignore[name-defined]
                seen.append(case.operation.label)
                case.call_and_validate(checks=CHECKS, timeout=60)

            check()
            ran[op.label] = len(seen) - before
        rich = [label for label, n in ran.items() if n >= budget[label]]
        deficit = MIN_CASES + 20 - len(seen)
        budget = {label: -(-deficit // len(rich)) for label in rich} if rich and deficit > 0 else {}


def test_enough_cases_ran(srv: LiveServer) -> None:
    assert len(seen) >= MIN_CASES, (len(seen), sorted(set(seen)))
    assert srv.wait_idle(5.0).kv_blocks_used == 0
