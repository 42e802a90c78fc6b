"""``airun chat`` and ``airun run`` on the real demo model, driven through a pseudo-terminal (pexpect) or pipes.

References: conversation token counts come from transformers' own tokenizer and chat template read from the same GGUF;
parameter counts from transformers models built on the meta device; stats lines from hand-computed values.
The 135M demo model does not recall "Alice" in its second greedy answer, so the history is checked exactly instead:
the prompt token count the stats line reports equals the reference count of the whole conversation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from airun.cli import build_parser
from airun.cli_chat import AnswerStats, GenerationOptions, count_parameters, format_count
from airun.loader.source import load_model_config, resolve_source

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TERM="dumb", NO_COLOR="1", PYTHONUNBUFFERED="1")
LOAD_TIMEOUT_S = 240
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STATS = re.compile(r"\[(\d+) prompt tokens(?: \((\d+) cached\))?, (\d+) tokens in [^\]]*\]")
PROMPT = ">>> "


# ---- units (no model) ------------------------------------------------------------------------------------------------
def test_format_count() -> None:
    assert format_count(134_515_008) == "134.5M"
    assert format_count(7_241_732_096) == "7.24B"
    assert format_count(1_500) == "1.5K"
    assert format_count(12) == "12"


def test_answer_stats_line() -> None:
    s = AnswerStats(prompt_tokens=39, output_tokens=40, seconds=2.0, first_token_s=0.05, cached_tokens=16,
                    finish_reason="length")
    assert s.tokens_per_second == pytest.approx(39 / 1.95)
    assert s.format() == "[39 prompt tokens (16 cached), 40 tokens in 2.00 s, 20.0 tok/s, first token 0.05 s, finish: length]"
    one = AnswerStats(prompt_tokens=5, output_tokens=1, seconds=0.5, first_token_s=0.5, finish_reason="stop")
    assert one.tokens_per_second is None
    assert one.format() == "[5 prompt tokens, 1 tokens in 0.50 s, first token 0.50 s, finish: stop]"
    assert AnswerStats().format() == "[]"


def test_generation_options() -> None:
    opts = GenerationOptions(max_tokens=40, temperature=0.0, seed=7)
    assert opts.sampling_params(100).max_tokens == 40
    assert opts.sampling_params(25).max_tokens == 25  # capped at the context left
    sp = GenerationOptions().sampling_params(300)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (300, 0.6, 1.0, 0, None)
    assert opts.workers_ai_inputs() == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 40, "seed": 7}
    assert GenerationOptions(top_k=5).workers_ai_inputs() == {"temperature": 0.6, "top_p": 1.0, "top_k": 5}


def test_parser() -> None:
    ns = build_parser().parse_args(["run", "demo", "What is 2+2?", "--temperature", "0", "--max-tokens", "9"])
    assert (ns.command, ns.target, ns.prompt, ns.temperature, ns.max_tokens, ns.url) == (
        "run", "demo", "What is 2+2?", 0.0, 9, None)
    ns = build_parser().parse_args(["chat", "--url", "http://h:1", "--token", "t", "--system", "Be brief."])
    assert (ns.command, ns.url, ns.token, ns.system, ns.model, ns.max_tokens) == (
        "chat", "http://h:1", "t", "Be brief.", None, None)
    assert build_parser().parse_args(["chat", "--url"]).url == "http://127.0.0.1:8787"
    assert build_parser().parse_args(["chat"]).url is None  # the in-process engine


# ---- parameter counts against transformers -----------------------------------------------------------------------------
def _meta_parameters(config: Any) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


def test_parameter_count_of_the_demo_model(demo_gguf: Path) -> None:
    from transformers import AutoConfig

    ref = _meta_parameters(AutoConfig.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name))
    assert count_parameters(load_model_config(resolve_source(str(demo_gguf)))) == ref == 134_515_008


def test_parameter_count_of_an_untied_mistral(tiny_mistral_dir: Path) -> None:
    from transformers import AutoConfig

    ref = _meta_parameters(AutoConfig.from_pretrained(str(tiny_mistral_dir)))
    assert count_parameters(load_model_config(resolve_source(str(tiny_mistral_dir)))) == ref


# ---- the commands on the demo model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref_tokenizer(demo_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name)


def count_tokens(tok: Any, messages: list[dict[str, str]]) -> int:
    """The prompt length of ``messages`` by transformers' rendering of the model's own chat template."""
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def spawn(*args: str) -> Any:
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "airun", *args], env=ENV, cwd=str(ROOT), encoding="utf-8",
                          timeout=LOAD_TIMEOUT_S, dimensions=(50, 200))
    child.expect_exact(PROMPT)
    return child


def turn(child: Any, text: str) -> tuple[str, re.Match[str]]:
    """Sends one line; returns the answer exactly as streamed (from the terminal's text) and the stats line match."""
    child.sendline(text)
    child.expect(STATS)
    stats = STATS.search(ANSI.sub("", child.after))
    assert stats is not None
    before = ANSI.sub("", child.before).replace("\r\n", "\n")
    echo = before.index(text + "\n")
    answer = before[echo + len(text) + 1:]
    assert answer.endswith("\n")  # the one newline the chat writes after every answer
    child.expect_exact(PROMPT)
    return answer[:-1], stats


@pytest.mark.slow
def test_chat_keeps_the_history_and_reset_clears_it(demo_gguf: Path, ref_tokenizer: Any) -> None:
    import pexpect

    child = spawn("chat", "--model", str(demo_gguf), "--temperature", "0", "--max-tokens", "40", "--threads", "1")
    try:
        history = [{"role": "user", "content": "My name is Alice. Please remember it."}]
        first, stats = turn(child, history[0]["content"])
        assert first.strip()
        assert int(stats[1]) == count_tokens(ref_tokenizer, history)
        assert 1 <= int(stats[3]) <= 40

        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
        second, stats = turn(child, "What is my name?")
        assert int(stats[1]) == count_tokens(ref_tokenizer, history)
        assert int(stats[2]) > 0  # the first turn's prompt came from the prefix cache

        child.sendline("/reset")
        child.expect_exact("(history cleared)")
        child.expect_exact(PROMPT)
        _, stats = turn(child, "What is my name?")
        assert int(stats[1]) == count_tokens(ref_tokenizer, [{"role": "user", "content": "What is my name?"}])

        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_drops_the_turn(demo_gguf: Path, ref_tokenizer: Any) -> None:
    """Through ``airun run MODEL`` without a prompt (which starts a chat), with a system prompt."""
    import pexpect

    system = "You are a patient assistant."
    child = spawn("run", str(demo_gguf), "--temperature", "0", "--max-tokens", "1000", "--threads", "1",
                  "--system", system)
    try:
        child.sendline("Count from 1 to 500, separated by commas.")
        child.expect_exact("commas.")
        child.expect(r"\w")  # the answer has begun
        child.sendintr()
        child.expect(r"\[interrupted\] \[(\d+) prompt tokens(?: \(\d+ cached\))?, (\d+) tokens in [^\]]*finish: abort\]")
        assert int(child.match[2]) < 1000
        child.expect_exact(PROMPT)

        _, stats = turn(child, "What is my name?")  # the interrupted turn is not in the history
        expected = [{"role": "system", "content": system}, {"role": "user", "content": "What is my name?"}]
        assert int(stats[1]) == count_tokens(ref_tokenizer, expected)

        child.sendintr()  # at the prompt: a hint, not an exit
        child.expect_exact("/exit or Ctrl-D")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "airun", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, cwd=str(ROOT), timeout=LOAD_TIMEOUT_S, check=False)


@pytest.mark.slow
def test_run_answers_one_prompt_on_stdout(demo_gguf: Path, ref_tokenizer: Any) -> None:
    proc = run_cli("run", str(demo_gguf), "What is the capital of France?", "--temperature", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "prompt tokens" not in proc.stdout and "airun:" not in proc.stdout  # stdout holds only the answer
    assert f"airun: ready: {demo_gguf}: llama, 134.5M parameters" in proc.stderr
    assert "context 8192 tokens" in proc.stderr  # SmolLM2's trained context, below the default cap
    stats = STATS.search(proc.stderr)
    assert stats is not None
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert int(stats[1]) == count_tokens(ref_tokenizer, question)


@pytest.mark.slow
def test_run_reads_the_prompt_from_stdin(demo_gguf: Path) -> None:
    proc = run_cli("run", str(demo_gguf), "--temperature", "0", "--max-tokens", "20", "--threads", "1",
                   stdin="What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


# ---- against a running server ------------------------------------------------------------------------------------------
TOKEN = "chat-secret"


@pytest.fixture(scope="module")
def server(demo_gguf: Path) -> Iterator[Any]:
    from airun.server.settings import ServerSettings
    from tests.http_fixtures import live_server, small_engine_args

    with live_server(small_engine_args(demo_gguf), ServerSettings(api_tokens=(TOKEN,))) as srv:
        yield srv


@pytest.mark.slow
def test_chat_against_a_server(server: Any, ref_tokenizer: Any) -> None:
    import pexpect

    child = spawn("chat", "--url", server.url, "--token", TOKEN, "--temperature", "0", "--max-tokens", "40")
    try:
        assert f"airun chat with {server.model}." in ANSI.sub("", child.before)  # found by models/search
        history = [{"role": "user", "content": "My name is Alice. Please remember it."}]
        first, stats = turn(child, history[0]["content"])
        assert int(stats[1]) == count_tokens(ref_tokenizer, history)
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
        _, stats = turn(child, "What is my name?")
        assert int(stats[1]) == count_tokens(ref_tokenizer, history)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_against_a_server_aborts_the_request(server: Any) -> None:
    import pexpect

    before = server.stats().generation_tokens_total
    child = spawn("chat", "--url", server.url, "--token", TOKEN, "--temperature", "0", "--max-tokens", "1000")
    try:
        child.sendline("Count from 1 to 500, separated by commas.")
        child.expect_exact("commas.")
        child.expect(r"\w")
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(PROMPT)
        stats = server.wait_idle(timeout_s=10.0)  # the closed stream made the server abort it
        assert stats.num_running == 0 and stats.kv_blocks_used == 0
        assert stats.generation_tokens_total - before < 1000
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_refuses_an_unreachable_server() -> None:
    proc = run_cli("chat", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "cannot reach an airun server at http://127.0.0.1:9" in proc.stderr
