"""Reading a JSON request body at the edge: content type, UTF-8, strict JSON, valid Unicode.

Invariant: :func:`read_json_body` either returns a value made of dict / list / str / int / float / bool / None whose
strings are all valid Unicode (no unpaired surrogates, no NUL) and whose numbers are finite, or raises the 400/5006 ApiError
saying what is wrong with the body.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from airun.server.errors import bad_input

# Media types a JSON body may arrive with: JSON itself, and what curl (-d) and fetch() send by default.
_ACCEPTED_TYPES = {"application/json", "text/plain", "application/x-www-form-urlencoded"}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _ACCEPTED_TYPES or (media.startswith("application/") and media.endswith("+json"))


def parse_json(raw: bytes, request_id: str | None) -> Any:
    if not raw.strip():
        raise bad_input("the request body is empty: send the input as a JSON object", request_id)
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise bad_input(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})", request_id) from e
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as e:
        raise bad_input("the request body is nested too deeply", request_id) from e
    except ValueError as e:
        raise bad_input(f"the request body is not valid JSON: {e}", request_id) from e
    check_unicode(value, request_id)
    return value


def check_unicode(value: Any, request_id: str | None) -> None:
    """Raises 400/5006 if a string anywhere in ``value`` (keys included) holds an unpaired surrogate (not encodable
    as UTF-8) or a NUL character."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                raise bad_input("a string in the input holds a NUL character", request_id)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_input("a string in the input holds an unpaired surrogate (invalid Unicode)", request_id) from e
    except (TypeError, ValueError, RecursionError) as e:
        raise bad_input(f"the input cannot be read: {e}", request_id) from e


async def read_json_body(request: Request, request_id: str | None) -> Any:
    ctype = request.headers.get("content-type")
    if not is_json_content_type(ctype):
        raise bad_input(f"unsupported Content-Type {ctype!r}: send the input as application/json", request_id)
    return parse_json(await request.body(), request_id)
