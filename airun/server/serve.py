"""``airun serve``: the HTTP server on the command line.

Invariants: without an API token the server binds only to a loopback address unless ``--insecure`` is given; the
socket is open (``/health`` 503) while the model loads, and a load failure stops the server with exit status 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from airun.server.auth import ENV_TOKEN, load_tokens
from airun.server.settings import ServerSettings

log = logging.getLogger("airun.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from airun.cli import add_engine_arguments

    add_engine_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--served-model-name", default=None,
                   help="the Workers AI model name requests use (default: derived from the checkpoint, "
                        "@hf/mistral/mistral-7b-instruct-v0.2 for Mistral-7B-Instruct-v0.2)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8787)
    g.add_argument("--api-token", action="append", default=None,
                   help=f"bearer token clients must send (repeatable; also ${ENV_TOKEN}, comma-separated)")
    g.add_argument("--api-token-file", default=None, help="file with one bearer token per line")
    g.add_argument("--insecure", action="store_true",
                   help="allow serving without a token on a non-loopback address")
    g.add_argument("--account-id", default=None, help="the only account id accepted in paths (default: any)")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a non-streamed request may run before 408 (default: no limit)")
    g.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="requests served at once; more get 429 (default: no limit, the engine queues them)")
    g.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted (default 1 MiB; fine-tune uploads: the adapter size cap)")
    g.add_argument("--max-body-mb", type=float, default=None, help="the same in MiB")
    r = parser.add_argument_group("reliability")
    r.add_argument("--max-waiting-requests", type=int, default=256,
                   help="generation requests admitted beyond the engine's batch (max_num_seqs); more get 429/3040")
    r.add_argument("--max-queued-tokens", type=int, default=2**20,
                   help="estimated prompt tokens (body bytes / 4) of the admitted requests; more get 429/3040")
    r.add_argument("--rate-limit-rpm", type=int, default=None,
                   help="generation requests a minute per API token (or client address); more get 429/3021")
    r.add_argument("--rate-limit-tpm", type=int, default=None,
                   help="estimated prompt tokens a minute per API token (or client address); more get 429/3021")
    r.add_argument("--max-tokens-cap", type=int, default=None, help="clamp every request's max_tokens to this")
    r.add_argument("--shutdown-grace-seconds", type=float, default=30.0,
                   help="after SIGTERM, how long in-flight requests may run before they are aborted")
    r.add_argument("--exit-on-engine-error", action="store_true",
                   help="a model-step fault stops the server with exit status 1 (for a supervisor to restart it)")
    r.add_argument("--public-metrics", action="store_true", help="serve GET /metrics without an API token")
    g.add_argument("--no-playground", action="store_true", help="do not serve the browser playground at /")


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def settings_from(args: argparse.Namespace, tokens: tuple[str, ...]) -> ServerSettings:
    return ServerSettings(
        served_model_name=args.served_model_name,
        api_tokens=tokens,
        account_id=args.account_id,
        max_body_bytes=body_limit(args),
        request_timeout_s=args.request_timeout,
        max_concurrent_requests=args.max_concurrent_requests,
        serve_playground=not args.no_playground,
        enable_lora=bool(getattr(args, "enable_lora", False) or getattr(args, "lora", None)),
        max_waiting_requests=args.max_waiting_requests,
        max_queued_tokens=args.max_queued_tokens,
        rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm,
        max_tokens_cap=args.max_tokens_cap,
        shutdown_grace_s=args.shutdown_grace_seconds,
        exit_on_engine_error=args.exit_on_engine_error,
        public_metrics=args.public_metrics,
    )


def body_limit(args: argparse.Namespace) -> int:
    if args.max_body_bytes is not None:
        return int(args.max_body_bytes)
    if args.max_body_mb is not None:
        return int(args.max_body_mb * 2**20)
    return ServerSettings().max_body_bytes


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from airun.cli import engine_args_from
    from airun.server.app import create_app
    from airun.server.lifecycle import DrainingServer

    try:
        tokens = load_tokens(args.api_token, args.api_token_file)
    except (OSError, ValueError) as e:
        print(f"airun: error: cannot read the API tokens: {e}", file=sys.stderr)
        return 2
    if not tokens and not is_loopback(args.host) and not args.insecure:
        print(
            f"airun: error: refusing to serve on {args.host} without an API token: anyone who can reach it could use "
            f"it. Give --api-token (or ${ENV_TOKEN}), or --insecure to serve without one.",
            file=sys.stderr,
        )
        return 2
    engine_args = engine_args_from(args)
    if args.kv_cache_prefault is None:  # a server commits its KV budget up front: its RSS then stays flat under load
        engine_args.kv_cache_prefault = True
    failed: list[BaseException] = []
    server: DrainingServer | None = None

    def load() -> object:
        from airun.engine.async_engine import AsyncEngine

        return AsyncEngine.from_args(engine_args)

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    settings = settings_from(args, tokens)
    app = create_app(None, settings, loader=load, on_load_error=on_load_error)  # type: ignore[arg-type]
    level = str(getattr(args, "log_level", "info")).lower()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level, timeout_graceful_shutdown=5,
                            proxy_headers=False)
    server = DrainingServer(config, app.state.airun)
    print(f"airun: serving on http://{args.host}:{args.port} (the model loads in the background; /health says when)",
          file=sys.stderr, flush=True)
    server.run()
    if failed:
        print(f"airun: error: the model could not be loaded: {failed[0]}", file=sys.stderr)
        return 1
    return server.exit_code
