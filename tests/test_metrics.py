"""``GET /metrics`` and the access log over a real uvicorn server on the demo model, after a known set of requests.

The expected values are counted from the requests this module sends and the ``usage`` the server answered; the
exposition is parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from airun.server.settings import ServerSettings
from tests.http_fixtures import LiveServer, live_server, small_engine_args

pytestmark = pytest.mark.slow

RUN_ROUTE = "/client/v4/accounts/{account_id}/ai/run/{model}"
UNKNOWN = "@hf/nobody/no-such-model"


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def access() -> Iterator[ListHandler]:
    logger = logging.getLogger("airun.access")
    handler, level = ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def srv(access: ListHandler) -> Iterator[LiveServer]:
    with live_server() as s:
        yield s


def wait_records(handler: ListHandler, n: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The first ``n`` access-log lines, parsed (a request is logged just after its last byte is sent)."""
    deadline = time.monotonic() + timeout_s
    while len(handler.records) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return [json.loads(r.getMessage()) for r in handler.records[:n]]


def scrape(srv: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(srv.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def streamed_usage(r: httpx.Response) -> dict[str, int]:
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


@pytest.fixture(scope="module")
def traffic(srv: LiveServer, access: ListHandler) -> dict[str, Any]:
    """Sends 3 non-streamed and 2 streamed generations, one bad input and one unknown model; waits until all ended."""
    before = scrape(srv)
    sent: list[tuple[httpx.Response, int, str, dict[str, int] | None]] = []  # response, status, model label, usage
    for i, n in enumerate((4, 6, 9)):
        r = httpx.post(srv.run_url(), json={"prompt": f"Count to {i + 3}.", "max_tokens": n}, timeout=120)
        assert r.status_code == 200, r.text
        sent.append((r, 200, srv.model, r.json()["result"]["usage"]))
    for n in (5, 7):
        body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": n, "stream": True}
        r = httpx.post(srv.run_url(), json=body, timeout=120)
        assert r.status_code == 200, r.text
        sent.append((r, 200, srv.model, streamed_usage(r)))
    r = httpx.post(srv.run_url(), json={"prompt": 5}, timeout=30)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006
    sent.append((r, 400, srv.model, None))
    r = httpx.post(srv.run_url(UNKNOWN), json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5007
    sent.append((r, 400, "", None))
    srv.wait_idle(10.0)
    records = wait_records(access, 1 + len(sent))  # the first scrape, then the requests
    return {"before": before, "sent": sent, "records": records, "after": scrape(srv)}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_request_counter_counts_by_model_route_and_status(srv: LiveServer, traffic: dict[str, Any]) -> None:
    before, after = traffic["before"], traffic["after"]
    assert not [k for k in before if k[0] == "airun_requests_total"]  # nothing answered before the first scrape
    counted = {k[1]: v for k, v in after.items() if k[0] == "airun_requests_total"}
    assert counted == {
        (("model", srv.model), ("route", RUN_ROUTE), ("status", "200")): 5.0,
        (("model", srv.model), ("route", RUN_ROUTE), ("status", "400")): 1.0,
        (("model", ""), ("route", RUN_ROUTE), ("status", "400")): 1.0,
        (("model", ""), ("route", "/metrics"), ("status", "200")): 1.0,
    }


def test_token_counters_equal_the_usage_answered(traffic: dict[str, Any]) -> None:
    usages = [u for _, _, _, u in traffic["sent"] if u is not None]
    assert len(usages) == 5
    after = traffic["after"]
    assert value(after, "airun_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value(after, "airun_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)


def test_latency_histograms_count_each_generation(srv: LiveServer, traffic: dict[str, Any]) -> None:
    after = traffic["after"]
    usages = [u for _, _, _, u in traffic["sent"] if u is not None]
    for name in ("airun_time_to_first_token_seconds", "airun_e2e_request_latency_seconds",
                 "airun_request_queue_time_seconds"):
        assert value(after, name + "_count", model=srv.model) == 5, name
        assert value(after, name + "_bucket", model=srv.model, le="+Inf") == 5, name
        assert value(after, name + "_sum", model=srv.model) > 0 or name == "airun_request_queue_time_seconds"
    gaps = sum(u["completion_tokens"] - 1 for u in usages)
    assert value(after, "airun_inter_token_latency_seconds_count", model=srv.model) == gaps
    ttft = value(after, "airun_time_to_first_token_seconds_sum", model=srv.model)
    e2e = value(after, "airun_e2e_request_latency_seconds_sum", model=srv.model)
    assert e2e >= ttft  # each request's last output comes no earlier than its first token


def test_engine_gauges_are_idle_once_all_requests_end(srv: LiveServer, traffic: dict[str, Any]) -> None:
    after = traffic["after"]
    assert value(after, "airun_kv_blocks_used") == 0
    assert value(after, "airun_kv_blocks_total") == srv.stats().kv_blocks_total > 0
    assert value(after, "airun_num_requests_running") == value(after, "airun_num_requests_waiting") == 0
    assert value(after, "airun_http_generations_in_flight") == 0
    assert value(after, "airun_lora_adapters_loaded") == 0  # LoRA is off
    assert ("airun_num_preemptions_total", ()) in after
    assert ("airun_prefix_cache_hit_rate", ()) in after


def test_access_log_has_one_json_line_per_request(srv: LiveServer, traffic: dict[str, Any]) -> None:
    first, *records = traffic["records"]
    assert (first["method"], first["route"], first["status"]) == ("GET", "/metrics", 200)
    assert "model" not in first and "prompt_tokens" not in first
    assert len(records) == len(traffic["sent"])
    for rec, (r, status, model, usage) in zip(records, traffic["sent"], strict=True):
        assert rec["request_id"] == r.headers["x-request-id"] and len(rec["request_id"]) == 32
        assert (rec["method"], rec["route"], rec["status"]) == ("POST", RUN_ROUTE, status)
        assert rec.get("model", "") == model
        assert isinstance(rec["duration_s"], float) and rec["duration_s"] >= 0
        if usage is None:
            assert "prompt_tokens" not in rec
        else:
            assert (rec["prompt_tokens"], rec["completion_tokens"]) == (usage["prompt_tokens"],
                                                                        usage["completion_tokens"])
    assert len({rec["request_id"] for rec in traffic["records"]}) == len(traffic["records"])


def test_error_messages_carry_the_request_id(traffic: dict[str, Any]) -> None:
    bad = traffic["sent"][5][0]
    rid = bad.headers["x-request-id"]
    assert bad.json()["errors"][0]["message"].startswith("AiError: Bad input: ")
    assert bad.json()["errors"][0]["message"].endswith(f" ({rid})")


def test_loaded_adapters_gauge_counts_resident_lora_adapters(tiny_mistral_dir: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.lora_fixtures import make_peft_adapter

    root = tmp_path_factory.mktemp("metrics-adapters")
    adapters = {name: str(make_peft_adapter(tiny_mistral_dir, root / name, seed=seed, r=4))
                for name, seed in (("sea", 31), ("sky", 32))}
    args = small_engine_args(tiny_mistral_dir, max_model_len=256, enable_lora=True, max_loras=2,
                             lora_modules=adapters, data_dir=str(root / "data"))
    with live_server(args, ServerSettings(served_model_name="@hf/mistral/mistral-7b-instruct-v0.2",
                                          enable_lora=True)) as srv:
        assert value(scrape(srv), "airun_lora_adapters_loaded") == 0
        for name in ("sea", "sky"):
            r = httpx.post(srv.run_url(), json={"prompt": "Hi", "max_tokens": 2, "lora": name}, timeout=120)
            assert r.status_code == 200, r.text
        srv.wait_idle(10.0)
        assert value(scrape(srv), "airun_lora_adapters_loaded") == 2
