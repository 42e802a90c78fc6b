"""Bearer-token authentication.

Invariants: a request is authenticated only by an ``Authorization: Bearer <token>`` header whose token equals one of
the configured tokens (compared with :func:`hmac.compare_digest`, over every configured token, so the time taken does
not reveal which one matched); a token anywhere else (cookie) authenticates nothing, and a request with a credential-named query
parameter is refused outright (401). The only route open
without a token is ``/health``, decided on the raw request path, so no percent-encoded spelling reaches another route
unauthenticated.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl

OPEN_PATHS = frozenset({b"/health"})
ENV_TOKEN = "AIRUN_API_TOKEN"


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def token_matches(presented: bytes | None, tokens: tuple[str, ...]) -> bool:
    if presented is None:
        return False
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(presented, t.encode("utf-8"))
    return ok


QUERY_TOKEN_NAMES = frozenset({"token", "access_token", "api_token", "api_key", "apikey", "key", "auth",
                               "authorization", "bearer"})


def has_query_token(query_string: bytes) -> bool:
    """Whether the query string carries a parameter named like a credential (any case, percent-decoded)."""
    if not query_string:
        return False
    names = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return any(name.strip().lower() in QUERY_TOKEN_NAMES for name, _ in names)


def is_open_path(raw_path: bytes) -> bool:
    return raw_path in OPEN_PATHS


def load_tokens(
    flag_tokens: list[str] | None, token_file: str | None, env: dict[str, str] | None = None
) -> tuple[str, ...]:
    """Tokens from ``--api-token`` (repeatable), ``$AIRUN_API_TOKEN`` (comma-separated) and ``--api-token-file`` (one
    per line, ``#`` comments); blanks are dropped, order kept, duplicates removed. Raises OSError for an unreadable
    file and ValueError for a token with whitespace inside."""
    environ: Mapping[str, str] = os.environ if env is None else env
    found: list[str] = []
    for t in flag_tokens or []:
        found.append(t)
    found.extend(environ.get(ENV_TOKEN, "").split(","))
    if token_file:
        for line in Path(token_file).read_text(encoding="utf-8").splitlines():
            if not line.strip().startswith("#"):
                found.append(line)
    out: list[str] = []
    for t in (x.strip() for x in found):
        if not t:
            continue
        if any(c.isspace() for c in t):
            raise ValueError("an API token must not contain whitespace")
        if t not in out:
            out.append(t)
    return tuple(out)
