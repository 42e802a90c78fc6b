"""Workers AI model inputs: schema validation, normalization, and the prompt token ids they stand for.

Invariants: :func:`parse_run_input` accepts exactly the objects valid under :func:`run_input_schema` and raises the
400/5006 ApiError naming the failing field (as a JSON pointer) and why otherwise. :func:`prompt_token_ids` is the only
place that turns an input into tokens: ``prompt`` with ``raw`` -> ``tokenizer.encode(prompt)`` (special tokens as the
tokenizer adds them), ``prompt`` without ``raw`` -> a single user turn through the chat template, ``messages`` -> the
chat template over the messages, text parts joined with a blank line (mistral-common's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from airun.errors import InvalidRequestError
from airun.sampling_params import SamplingParams
from airun.server.errors import bad_input, invalid_input
from airun.server.schemas import run_input_schema

PART_JOIN = "\n\n"
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6


class ChatTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...


@dataclass(slots=True)
class RunInput:
    """A validated input: exactly one of ``prompt`` / ``messages``; message contents are plain strings."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    raw: bool
    stream: bool
    sampling: SamplingParams
    lora: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] = field(default_factory=list)
    functions: list[Any] = field(default_factory=list)


@cache
def _validators() -> dict[str, Draft202012Validator]:
    schema = run_input_schema()
    out = {}
    for variant in schema["oneOf"]:
        key = "messages" if "messages" in variant["properties"] else "prompt"
        Draft202012Validator.check_schema(variant)
        out[key] = Draft202012Validator(variant)
    return out


def _pointer(error: ValidationError) -> str:
    return "/" + "/".join(str(p) for p in error.absolute_path)


def _describe(error: ValidationError) -> str:
    if error.validator in ("oneOf", "anyOf") and error.context:
        kinds = sorted({str(e.schema.get("type")) for e in error.context if e.validator == "type"})
        if kinds:
            return f"'{_pointer(error)}': {error.instance!r:.60} must be one of the types {', '.join(kinds)}"
    return f"'{_pointer(error)}': {error.message:.200}"


def validate_run_input(body: Any, request_id: str | None) -> str:
    """Checks ``body`` against the input schema; returns which variant it is ("prompt" or "messages")."""
    if not isinstance(body, dict):
        raise bad_input(f"the input must be a JSON object, not {type(body).__name__}", request_id)
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        what = "both" if has_prompt else "neither"
        raise bad_input(f"the input must have exactly one of 'prompt' or 'messages' (it has {what})", request_id)
    variant = "prompt" if has_prompt else "messages"
    errors = list(_validators()[variant].iter_errors(body))
    if errors:
        first = best_match(sorted(errors, key=lambda e: list(map(str, e.absolute_path))))
        raise bad_input(_describe(first), request_id)
    return variant


def _as_bool(value: Any) -> bool:
    return value is True or value == "true"


def _content_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return PART_JOIN.join(part["text"] for part in content)


def parse_run_input(body: Any, request_id: str | None) -> RunInput:
    variant = validate_run_input(body, request_id)

    def num(key: str, default: Any) -> Any:
        v = body.get(key)
        return default if v is None else v

    top_k = body.get("top_k")
    sampling = SamplingParams(
        max_tokens=int(num("max_tokens", DEFAULT_MAX_TOKENS)),
        temperature=float(num("temperature", DEFAULT_TEMPERATURE)),
        top_k=int(top_k) if top_k is not None else 0,
        top_p=float(num("top_p", 1.0)),
        repetition_penalty=float(num("repetition_penalty", 1.0)),
        frequency_penalty=float(num("frequency_penalty", 0.0)),
        presence_penalty=float(num("presence_penalty", 0.0)),
        seed=int(body["seed"]) if body.get("seed") is not None else None,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    messages = None
    if variant == "messages":
        messages = [{"role": m["role"], "content": _content_text(m["content"])} for m in body["messages"]]
    return RunInput(
        prompt=body.get("prompt"),
        messages=messages,
        raw=_as_bool(body.get("raw", False)),
        stream=bool(body.get("stream", False)),
        sampling=sampling,
        lora=body.get("lora") or None,
        response_format=body.get("response_format"),
        tools=list(body.get("tools") or []) if variant == "messages" else [],
        functions=list(body.get("functions") or []) if variant == "messages" else [],
    )


def check_messages(messages: list[dict[str, str]]) -> None:
    """Raises 400/3010 for a conversation no chat template can render: empty, or with an unknown role."""
    if not messages:
        raise invalid_input("'messages' must hold at least one message")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise invalid_input(f"message {i} has the role {m['role']!r}; the roles are {', '.join(ROLES)}")


def chat_prompt_ids(tokenizer: ChatTokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template over ``messages``; a conversation the template refuses (roles out of order) -> 400/3010."""
    check_messages(messages)
    try:
        return list(tokenizer.apply_chat_template(messages))
    except InvalidRequestError as e:
        raise invalid_input(str(e)) from e


def prompt_token_ids(tokenizer: ChatTokenizer, run: RunInput) -> list[int]:
    if run.messages is not None:
        if run.raw:
            raise invalid_input("'raw' applies to 'prompt' inputs; 'messages' always go through the chat template")
        return chat_prompt_ids(tokenizer, run.messages)
    assert run.prompt is not None
    if run.raw:
        return list(tokenizer.encode(run.prompt))
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": run.prompt}])
