"""What the HTTP server is configured with (apart from the engine)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ServerSettings:
    """Invariants: ``api_tokens`` holds non-empty strings; when it is empty the server requires no token (``serve``
    refuses a non-loopback host then, unless told ``--insecure``). ``served_model_name`` None means the default name
    derived from the checkpoint (:func:`airun.server.catalog.default_served_name`)."""

    served_model_name: str | None = None
    api_tokens: tuple[str, ...] = ()
    account_id: str | None = None  # None: any account id in the path is accepted
    max_body_bytes: int = 2**20
    max_upload_bytes: int = 501 * 10**6  # fine-tune asset uploads: the 500 MB adapter cap plus multipart framing
    request_timeout_s: float | None = None  # requests running longer get 408/3007, streams an error frame (None: none)
    max_concurrent_requests: int | None = None  # requests beyond this get 429/3040 (None: the engine queues them)
    enable_lora: bool = False  # False: a non-empty `lora` gives 405/5005
    serve_playground: bool = True  # GET / serves the browser playground (airun/static)
    extra_model_aliases: tuple[str, ...] = field(default_factory=tuple)  # more names the OpenAI routes accept
    # ---- reliability (airun/server/admission.py, lifecycle.py) ----
    max_waiting_requests: int | None = 256  # admitted-but-unfinished generations beyond the engine's batch (None: any)
    max_queued_tokens: int | None = 2**20  # estimated prompt tokens (body bytes / 4) of those requests (None: any)
    rate_limit_rpm: int | None = None  # generation requests a minute per bearer token (or client address)
    rate_limit_tpm: int | None = None  # estimated prompt tokens a minute per bearer token (or client address)
    max_tokens_cap: int | None = None  # max_tokens of every request is clamped to this (None: no clamp)
    shutdown_grace_s: float = 30.0  # after SIGTERM, in-flight requests get this long before they are aborted
    exit_on_engine_error: bool = False  # a model-step fault kills the engine (/health 503) and the process exits 1
    public_metrics: bool = False  # GET /metrics without a token
