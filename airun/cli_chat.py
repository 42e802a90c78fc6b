"""The terminal experience: ``airun chat`` (an interactive streaming chat) and ``airun run`` (one-shot, like ollama).

A chat talks to an in-process :class:`LLMEngine` or, with ``--url``, to a running airun server through
:class:`airun.client.AI` on the Workers AI streaming route. The whole conversation is sent every turn.

Invariants:
- stdout carries only the conversation (the prompt and the answers); progress, the load summary, the stats line after
  each answer, notices and errors go to stderr.
- The history holds only complete turns: a turn that was interrupted (Ctrl-C) or failed leaves it unchanged, and its
  request is aborted (local: ``abort_request`` frees its KV blocks; remote: the stream is closed, so the server
  aborts it).
- Local: SIGINT during an answer is deferred to the next step boundary, so an engine step is never cut in half.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from airun.errors import AirunError, ContextLengthError
from airun.model.config import ModelConfig
from airun.sampling_params import SamplingParams

if TYPE_CHECKING:
    from airun.client import AI
    from airun.engine.args import EngineArgs
    from airun.engine.llm_engine import LLMEngine

DEFAULT_URL = "http://127.0.0.1:8787"
PROMPT = ">>> "
SERVER_WAIT_S = 600.0  # how long `chat --url` waits for a server that is still loading its model (503)
HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits, /help shows this; Ctrl-C stops an answer"


# ---- load summary ------------------------------------------------------------------------------------------------------
def count_parameters(cfg: ModelConfig) -> int:
    """The parameter count of the decoder ``cfg`` describes (tied embeddings counted once), whatever its storage."""
    h, kv_dim, q_dim = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.num_attention_heads * cfg.head_dim
    attention = h * q_dim + 2 * h * kv_dim + q_dim * h
    mlp = 3 * h * cfg.intermediate_size
    per_layer = attention + mlp + 2 * h  # + the two RMSNorm weights
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_hidden_layers * per_layer + embeddings + h  # + the final norm


def format_count(n: int) -> str:
    """``134515008 -> "134.5M"``, ``7241732096 -> "7.24B"``."""
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 10**3 else str(n)


def describe_engine(engine: LLMEngine) -> str:
    """One line: model, architecture and size, weight storage, dtype and device, load time, KV cache, context."""
    dtype = str(engine.dtype).removeprefix("torch.")
    plan = engine.quant_plan
    weights = "+".join(sorted(set(plan.formats.values()))) if plan is not None and plan.formats else dtype
    src = engine.source
    where = "" if src.name == str(src.path) else f" ({src.path.name})"
    blocks, block_size = engine.kv.num_blocks, engine.args.block_size
    return (
        f"{src.name}{where}: {engine.model_config.model_type}, {format_count(count_parameters(engine.model_config))} "
        f"parameters, {weights} weights, {dtype} on {engine.device}, loaded in {engine.load_seconds:.1f} s; "
        f"KV cache {blocks} blocks x {block_size} tokens; context {engine.max_model_len} tokens"
    )


def print_load_summary(engine: LLMEngine, file: TextIO | None = None) -> None:
    """Writes :func:`describe_engine` to stderr (or ``file``)."""
    print(f"airun: ready: {describe_engine(engine)}", file=file or sys.stderr, flush=True)


def load_engine(args: EngineArgs) -> LLMEngine:
    """Builds the engine (fetch and load progress come from the loader), then prints the load summary on stderr."""
    from airun.engine.llm_engine import LLMEngine

    print(f"airun: loading {args.model or 'the demo model'}...", file=sys.stderr, flush=True)
    engine = LLMEngine(args)
    print_load_summary(engine)
    return engine


# ---- one answer ------------------------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class GenerationOptions:
    """Sampling of every answer. ``max_tokens=None``: until the model stops or the context is full (local), or the
    server's default (remote)."""

    max_tokens: int | None = None
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def sampling_params(self, room: int) -> SamplingParams:
        """The engine's parameters, ``max_tokens`` capped at ``room`` (the context left after the prompt)."""
        limit = room if self.max_tokens is None else min(self.max_tokens, room)
        return SamplingParams(max_tokens=limit, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed)

    def workers_ai_inputs(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                                  "top_k": self.top_k or None, "seed": self.seed}
        return {k: v for k, v in fields.items() if v is not None}


@dataclass(slots=True)
class AnswerStats:
    """What one answer cost. Token counts are None when the server did not report them; ``first_token_s`` is None
    when nothing arrived."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None
    seconds: float = 0.0
    first_token_s: float | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """The decode rate: the tokens after the first, over the time after the first arrived."""
        if self.output_tokens is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        span = self.seconds - self.first_token_s
        return (self.output_tokens - 1) / span if span > 0 else None

    def format(self) -> str:
        parts = []
        if self.prompt_tokens is not None:
            cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
            parts.append(f"{self.prompt_tokens} prompt tokens{cached}")
        if self.output_tokens is not None:
            parts.append(f"{self.output_tokens} tokens in {self.seconds:.2f} s")
        rate = self.tokens_per_second
        if rate is not None:
            parts.append(f"{rate:.1f} tok/s")
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s:.2f} s")
        if self.finish_reason:
            parts.append(f"finish: {self.finish_reason}")
        return "[" + ", ".join(parts) + "]"


class ChatBackend(Protocol):
    """Streams the answer to a conversation; ``last`` holds the stats of the latest answer once it ends."""

    name: str
    last: AnswerStats

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]: ...


@dataclass(slots=True)
class SigintFlag:
    requested: bool = False


@contextmanager
def deferred_sigint() -> Iterator[SigintFlag]:
    """While active (main thread only), SIGINT sets ``flag.requested`` instead of raising KeyboardInterrupt."""
    flag = SigintFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalChat:
    """Answers with an in-process engine, the prompt laid out by the tokenizer's own chat template."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.name = engine.source.name
        self.last = AnswerStats()

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
        engine, rid = self.engine, uuid.uuid4().hex
        t0 = time.monotonic()
        self.last = stats = AnswerStats()
        finished = False
        try:
            with deferred_sigint() as sigint:
                ids = engine.tokenizer.apply_chat_template(messages)
                stats.prompt_tokens = len(ids)
                room = engine.max_model_len - len(ids)
                if room < 1:
                    raise ContextLengthError(len(ids) + 1, engine.max_model_len, "Use /reset to start over.")
                engine.add_request(rid, ids, options.sampling_params(room))
                while not finished:
                    if sigint.requested:
                        engine.abort_request(rid)
                        finished, stats.finish_reason = True, "abort"
                        break
                    for out in engine.step():
                        if out.request_id != rid:
                            continue
                        if stats.first_token_s is None and out.num_output_tokens:
                            stats.first_token_s = time.monotonic() - t0
                        stats.output_tokens, stats.cached_tokens = out.num_output_tokens, out.num_cached_tokens
                        stats.seconds = time.monotonic() - t0
                        if out.finished:
                            finished, stats.finish_reason = True, out.finish_reason
                            if out.error:
                                raise AirunError(f"the engine failed: {out.error}")
                        if out.text:
                            yield out.text
        finally:
            stats.seconds = time.monotonic() - t0
            if not finished:
                engine.abort_request(rid)
                stats.finish_reason = "abort"


class RemoteChat:
    """Answers through a running airun (or Workers AI) server on its streaming run route."""

    def __init__(self, ai: AI, model: str) -> None:
        self.ai = ai
        self.name = model
        self.last = AnswerStats()

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
        t0 = time.monotonic()
        self.last = stats = AnswerStats(finish_reason="abort")
        self.ai.last_usage = None
        pieces = self.ai.run(self.name, {"messages": messages, **options.workers_ai_inputs()}, stream=True)
        try:
            for piece in pieces:
                if stats.first_token_s is None:
                    stats.first_token_s = time.monotonic() - t0
                yield piece
        finally:
            pieces.close()  # leaving early closes the connection: the server aborts the request
            stats.seconds = time.monotonic() - t0
        usage = self.ai.last_usage or {}
        stats.prompt_tokens, stats.output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        stats.finish_reason = None


def served_model(ai: AI, url: str, wait_s: float = SERVER_WAIT_S) -> str:
    """The name of the first model the server lists, waiting while it answers 503 (still loading its model)."""
    import httpx

    from airun.client import AiRunError

    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            models = ai.models()
            break
        except AiRunError as e:
            if e.status != 503 or time.monotonic() > deadline:
                raise AirunError(f"{url} refused to list its models: {e}") from e
            if not told:
                print(f"airun: waiting for {url} to load its model...", file=sys.stderr, flush=True)
                told = True
            time.sleep(1.0)
        except httpx.HTTPError as e:
            raise AirunError(f"cannot reach an airun server at {url}: {e}") from e
    if not models:
        raise AirunError(f"{url} serves no model")
    return str(models[0]["name"])


# ---- the conversation --------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Turn:
    answer: str
    stats: AnswerStats
    interrupted: bool


@dataclass(slots=True, eq=False)
class ChatSession:
    """A conversation. Invariant: ``messages`` is the optional system message, then alternating complete user and
    assistant turns; the assistant text is the answer exactly as streamed."""

    backend: ChatBackend
    options: GenerationOptions
    system: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> Turn:
        """Streams the answer to ``text`` onto ``out``; Ctrl-C stops it. Errors propagate, the history unchanged."""
        user = {"role": "user", "content": text}
        parts: list[str] = []
        interrupted = False
        pieces = self.backend.stream([*self.messages, user], self.options)
        try:
            for piece in pieces:
                parts.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            if parts:  # end the half-written answer's line before the error is reported
                self.out.write("\n")
            raise
        finally:
            pieces.close()  # type: ignore[attr-defined]
        stats = self.backend.last
        interrupted = interrupted or stats.finish_reason == "abort"
        answer = "".join(parts)
        if not interrupted:
            self.messages += [user, {"role": "assistant", "content": answer}]
        return Turn(answer, stats, interrupted)


def _note(text: str) -> None:
    """A line on stderr, dimmed on a colour terminal."""
    dim = sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    print(f"\x1b[2m{text}\x1b[0m" if dim else text, file=sys.stderr, flush=True)


def answer_turn(session: ChatSession, text: str) -> Turn | None:
    """Asks, writes one newline after the answer on stdout (so stdout holds each answer exactly, then "\\n") and
    prints the stats line on stderr; None (the error printed) when it failed."""
    import httpx

    from airun.client import AiRunError

    try:
        turn = session.ask(text)
    except (AirunError, AiRunError, httpx.HTTPError) as e:
        print(f"airun: error: {e}", file=sys.stderr, flush=True)
        return None
    session.out.write("\n")
    session.out.flush()
    _note(("[interrupted] " if turn.interrupted else "") + turn.stats.format())
    return turn


def repl(session: ChatSession) -> int:
    """The interactive loop on stdin: /reset, /exit, /help, Ctrl-D quits, Ctrl-C at the prompt clears the line."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() gets line editing and in-session history)
        except ImportError:
            pass
    print(f"airun chat with {session.backend.name}. {HELP}.", file=sys.stderr, flush=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            session.out.write("\n")
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)", file=sys.stderr, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/reset":
                session.reset()
                print("(history cleared)", file=sys.stderr, flush=True)
            else:
                print(HELP if cmd in ("/help", "/?") else f"unknown command {cmd}; {HELP}", file=sys.stderr)
            continue
        answer_turn(session, text)


# ---- the subcommands ---------------------------------------------------------------------------------------------------
def _quiet_logs(ns: argparse.Namespace) -> None:
    """At the default log level, INFO lines (the engine's, httpx's requests) would clutter a terminal chat: only
    warnings are logged; the load summary and the stats lines say the rest."""
    if str(getattr(ns, "log_level", "INFO")).upper() == "INFO":
        logging.getLogger().setLevel(logging.WARNING)


def _session(ns: argparse.Namespace) -> ChatSession:
    from airun.cli import engine_args_from

    _quiet_logs(ns)
    if ns.url:
        from airun.client import AI

        ai = AI(ns.url, token=ns.token, account_id=ns.account_id)
        backend: ChatBackend = RemoteChat(ai, ns.model or served_model(ai, ns.url))
    else:
        backend = LocalChat(load_engine(engine_args_from(ns)))
    options = GenerationOptions(ns.max_tokens, ns.temperature, ns.top_p, ns.top_k, ns.seed)
    return ChatSession(backend, options, system=ns.system)


def cmd_chat(ns: argparse.Namespace) -> int:
    return repl(_session(ns))


def cmd_run(ns: argparse.Namespace) -> int:
    if ns.model is not None and ns.model != ns.target:
        raise AirunError("give the model once: as MODEL or as --model")
    ns.model = ns.target
    prompt = ns.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip() or None
    if prompt is None:
        return cmd_chat(ns)
    turn = answer_turn(_session(ns), prompt)
    if turn is None:
        return 1
    return 130 if turn.interrupted else 0


def _chat_arguments(p: argparse.ArgumentParser, remote: bool) -> None:
    from airun.cli import add_engine_arguments

    add_engine_arguments(p)
    g = p.add_argument_group("chat")
    g.add_argument("--system", default=None, help="system prompt opening the conversation")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="longest answer (default: until the model stops or the context is full)")
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    if remote:
        g.add_argument("--url", nargs="?", const=DEFAULT_URL, default=None,
                       help=f"chat with a running airun server (bare --url: {DEFAULT_URL}) instead of loading the model "
                            "here; --model then names the served model (default: the one it lists first)")
        g.add_argument("--token", default=os.environ.get("AIRUN_API_TOKEN"),
                       help="bearer token of the server (default: $AIRUN_API_TOKEN)")
        g.add_argument("--account-id", default="local")
    else:
        p.set_defaults(url=None, token=None, account_id="local")


def add_subcommands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers ``chat`` and ``run`` on the ``airun`` parser's subcommands."""
    chat = sub.add_parser("chat", help="chat in the terminal, with a local model or a running server (--url)")
    _chat_arguments(chat, remote=True)
    chat.set_defaults(func=cmd_chat)

    run = sub.add_parser("run", help="answer one prompt, or chat when no prompt is given (like `ollama run`)")
    run.add_argument("target", metavar="MODEL", help="a model folder, .gguf file, hub id, or demo")
    run.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin when it is not a "
                                                              "terminal, else start a chat)")
    _chat_arguments(run, remote=False)
    run.set_defaults(func=cmd_run)
