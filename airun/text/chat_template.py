"""Chat messages to prompt token ids: the model's own Jinja chat template, rendered in a sandbox with a time limit.

Templates come only from the model's files; requests can never supply one. Rendering follows Hugging Face's
conventions (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``bos_token``, ``eos_token``,
``add_generation_prompt``, a ``tojson`` that keeps non-ASCII text), and the rendered text is tokenized without adding
BOS (the template writes it). Mistral [INST] templates are encoded at the token level instead (see mistral_chat).

Time limit: every attribute access, item access, call, ``*``/``**`` and ``range`` iteration step checks a deadline
and ``*``/``**``/``range`` results are size-capped, so a runaway template raises instead of spinning; a single
C-level operation already started cannot be interrupted.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from airun.errors import InvalidRequestError

if TYPE_CHECKING:
    from airun.text.tokenizer import Tokenizer

log = logging.getLogger("airun.text")

ROLES = ("system", "user", "assistant")
TEXT_PART_SEPARATOR = "\n\n"  # how mistral-common joins the text chunks of one message
RENDER_TIME_LIMIT_S = 2.0
MAX_RENDER_CHARS = 16 * 1024 * 1024
MAX_SEQUENCE_ITEMS = 1 << 20  # longest string / list a template may build with * or range()

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("airun_template_deadline", default=None)


@dataclass(slots=True, frozen=True)
class ChatMessage:
    """One validated message: ``role`` in ROLES, ``content`` the message text."""

    role: str
    content: str


def normalize_messages(messages: list[dict]) -> list[ChatMessage]:
    """Validates request messages; a content list of ``{"type": "text", "text": ...}`` parts becomes the texts
    joined by TEXT_PART_SEPARATOR. Raises InvalidRequestError."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    out: list[ChatMessage] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        out.append(ChatMessage(role, _content_text(m.get("content"), i)))
    return out


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}"
                )
            texts.append(part["text"])
        return TEXT_PART_SEPARATOR.join(texts)
    raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text parts")


# ---- the sandbox --------------------------------------------------------------------------------------------------
class _RenderTimeout(Exception):
    pass


def _check_deadline() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise _RenderTimeout


class _GuardedRange:
    """``range`` for templates: capped in length, checking the deadline while it is iterated."""

    __slots__ = ("_r",)

    def __init__(self, *args: int) -> None:
        r = range(*args)
        if len(r) > MAX_SEQUENCE_ITEMS:
            raise OverflowError(f"range of {len(r)} items is too long for a chat template")
        self._r = r

    def __iter__(self) -> Iterator[int]:
        for n, v in enumerate(self._r):
            if not n & 255:
                _check_deadline()
            yield v

    @classmethod
    def _of(cls, r: range) -> _GuardedRange:
        g = object.__new__(cls)
        g._r = r
        return g

    def __reversed__(self) -> Iterator[int]:
        return iter(_GuardedRange._of(self._r[::-1]))

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, index: int | slice) -> Any:
        item = self._r[index]
        return _GuardedRange._of(item) if isinstance(item, range) else item

    def __contains__(self, value: object) -> bool:
        return value in self._r

    def __repr__(self) -> str:
        return repr(self._r)


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with a deadline check on every hook it offers and size caps on ``*`` and ``**``."""

    intercepted_binops = frozenset({"*", "**"})

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    if len(seq) * times > MAX_SEQUENCE_ITEMS:
                        raise OverflowError("a chat template built a sequence that is too long")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise OverflowError("a chat template raised a number to too large a power")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.cache
def _environment() -> _GuardedEnvironment:
    env = _GuardedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=_GuardedRange)
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template; jinja2.TemplateSyntaxError if it does not parse."""
    return _environment().from_string(source)


def render_chat_template(
    source: str,
    messages: list[ChatMessage],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool,
    time_limit_s: float = RENDER_TIME_LIMIT_S,
) -> str:
    """The prompt text the template makes of ``messages``.

    Raises InvalidRequestError: with the template's own message when it calls ``raise_exception`` (a role order it
    refuses), or when rendering fails, exceeds ``time_limit_s`` or MAX_RENDER_CHARS.
    """
    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidRequestError(f"the model's chat template does not compile: {e}") from e
    context = {
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "bos_token": bos_token or "",
        "eos_token": eos_token or "",
        "add_generation_prompt": add_generation_prompt,
        "tools": None,
        "documents": None,
    }
    token = _deadline.set(time.monotonic() + time_limit_s)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**context):
            pieces.append(piece)
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise InvalidRequestError("the chat template rendered a prompt that is too long")
            _check_deadline()
    except InvalidRequestError:
        raise
    except _RenderTimeout:
        raise InvalidRequestError(f"rendering the chat template took longer than {time_limit_s:g} s") from None
    except jinja2.TemplateError as e:
        raise InvalidRequestError(str(e) or "the chat template refused these messages") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, ArithmeticError) as e:
        raise InvalidRequestError(f"the chat template failed on these messages: {e}") from e
    finally:
        _deadline.reset(token)
    return "".join(pieces)


def encode_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids of a conversation for ``tok``'s model (see Tokenizer.apply_chat_template)."""
    from airun.text.mistral_chat import encode_mistral_instruct, is_mistral_instruct_template

    source = tok.chat_template
    if not source:
        raise InvalidRequestError("this model has no chat template, so it cannot take messages; send a prompt instead")
    msgs = normalize_messages(messages)
    if is_mistral_instruct_template(source):
        return encode_mistral_instruct(tok, msgs)
    text = render_chat_template(
        source, msgs, bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=add_generation_prompt
    )
    return tok.encode(text, add_special_tokens=False)
