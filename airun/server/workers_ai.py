"""The Workers AI REST routes: run a model (streamed or not), search the catalog, read a model's schema.

Invariants: every answer is the envelope (success or error, never an error with HTTP 200); the model named in the
path is read from the raw request path, so ``@hf/a/b`` and ``@hf%2Fa%2Fb`` name the same model; a streamed answer's
``response`` fields concatenate to exactly the non-streamed text of the same (greedy) request, and its last frame
before ``[DONE]`` carries ``usage``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from airun.engine.outputs import RequestOutput
from airun.server.body import read_json_body
from airun.server.catalog import catalog_entry, search
from airun.server.errors import (
    ApiError,
    envelope,
    invalid_input,
    lora_unsupported,
    not_found,
    request_id_of,
    unknown_model,
)
from airun.server.generation import ClientDisconnected, Generation
from airun.server.inputs import RunInput, parse_run_input, prompt_token_ids
from airun.server.schemas import (
    RUN_STREAM_DESCRIPTION,
    SSE_CONTENT,
    ModelSchemaEnvelope,
    ModelsSearchEnvelope,
    RunEnvelope,
    error_responses,
    run_input_schema,
)
from airun.server.sse import DONE_FRAME, SSEResponse, frame, padding
from airun.server.state import AppState, app_state

ACCOUNT_PREFIX = "/client/v4/accounts/{account_id}/ai"
RUN_MARKER = "/ai/run/"
CLIENT_GONE_STATUS = 499  # nginx's "client closed request": never read by anyone, only logged

router = APIRouter(tags=["Workers AI"])


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_from_raw_path(request: Request) -> str:
    """The model name of a run route as the client spelled it, percent-decoded once (``%2F`` -> ``/``)."""
    raw = request.scope.get("raw_path") or request.url.path.encode("utf-8")
    path = raw.decode("latin-1")
    return unquote(path[path.index(RUN_MARKER) + len(RUN_MARKER):], encoding="utf-8", errors="replace")


def check_account(state: AppState, request: Request, account_id: str | None) -> None:
    wanted = state.settings.account_id
    if wanted is not None and account_id is not None and account_id != wanted:
        raise not_found(request.url.path)


def refuse_unsupported(run: RunInput, model: str, state: AppState) -> None:
    if run.lora and not state.settings.enable_lora:
        raise lora_unsupported(model)
    fmt = run.response_format or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        raise invalid_input("JSON mode (response_format) is not supported by this server")
    if run.tools or run.functions:
        raise invalid_input("tools and functions are not supported by this server")


async def _frames(gen: Generation, first: RequestOutput) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(gen.stream(first)) as outputs:
        try:
            async for out in outputs:
                if out.text:
                    yield frame({"response": out.text, "p": padding()})
                if out.finished:
                    yield frame({"response": "", "usage": usage(out.num_prompt_tokens, out.num_output_tokens)})
                    yield DONE_FRAME
                    return
        except ApiError as err:  # headers are gone: the failure travels as a last frame, then [DONE]
            yield frame(err.payload(gen.request_id))
            yield DONE_FRAME


async def run_model(request: Request, account_id: str | None) -> Response:
    state = app_state(request)
    rid = request_id_of(request)
    check_account(state, request, account_id)
    engine = state.require_engine()
    assert state.model is not None
    model = model_from_raw_path(request)
    if model != state.model.name:
        raise unknown_model(model)
    run = parse_run_input(await read_json_body(request, rid), rid)
    refuse_unsupported(run, model, state)
    ids = prompt_token_ids(engine.tokenizer, run)
    gen = Generation(state, request, ids, run.sampling, rid or "", run.lora)
    try:
        if run.stream:
            first = await gen.first()
            return SSEResponse(_frames(gen, first))  # type: ignore[return-value]
        done = await gen.complete()
    except ClientDisconnected:
        return Response(status_code=CLIENT_GONE_STATUS)
    return JSONResponse(envelope({"response": done.text, "usage": usage(done.prompt_tokens, done.completion_tokens)}))


RUN_DOC: dict[str, Any] = {
    "summary": "Run a text-generation model",
    "response_model": None,
    "responses": {
        200: {
            "model": RunEnvelope,
            "description": "The model's result in the envelope. " + RUN_STREAM_DESCRIPTION,
            "content": SSE_CONTENT,
        },
        **error_responses(400, 401, 404, 405, 408, 413, 429, 500, 503),
    },
    "openapi_extra": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": run_input_schema()}}}
    },
}


@router.post(ACCOUNT_PREFIX + "/run/{model:path}", operation_id="run_model", **RUN_DOC)
async def run_route(request: Request, account_id: str, model: str) -> Response:
    return await run_model(request, account_id)


@router.post("/ai/run/{model:path}", operation_id="run_model_short", **RUN_DOC)
async def run_short_route(request: Request, model: str) -> Response:
    return await run_model(request, None)


@router.get(
    ACCOUNT_PREFIX + "/models/search",
    operation_id="models_search",
    response_model=None,
    responses={200: {"model": ModelsSearchEnvelope}, **error_responses(400, 401, 404, 500, 503)},
)
async def models_search(
    request: Request,
    account_id: str,
    search_text: str | None = Query(None, alias="search"),
    task: str | None = None,
    author: str | None = None,
    source: int | None = None,
    hide_experimental: str | None = None,
    page: int = Query(1, ge=1, le=10**9),
    per_page: int = Query(20, ge=1, le=1000),
) -> JSONResponse:
    state = app_state(request)
    check_account(state, request, account_id)
    state.require_engine()
    assert state.model is not None
    found = search([catalog_entry(state.model)], search=search_text, task=task, author=author, source=source,
                   hide_experimental=hide_experimental)
    start = (page - 1) * per_page
    items = found[start:start + per_page]
    body = envelope(items)
    body["result_info"] = {"page": page, "per_page": per_page, "count": len(items), "total_count": len(found)}
    return JSONResponse(body)


@router.get(
    ACCOUNT_PREFIX + "/models/schema",
    operation_id="models_schema",
    response_model=None,
    responses={200: {"model": ModelSchemaEnvelope}, **error_responses(400, 401, 404, 500, 503)},
)
async def models_schema(request: Request, account_id: str, model: str = Query(..., min_length=1)) -> JSONResponse:
    state = app_state(request)
    check_account(state, request, account_id)
    state.require_engine()
    assert state.model is not None
    if model != state.model.name:
        raise unknown_model(model)
    schema = catalog_entry(state.model)["schema"]
    return JSONResponse(envelope({"input": schema["input"], "output": schema["output"]}))
