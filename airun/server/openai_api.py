"""The OpenAI-compatible routes: chat completions, text completions and the model list.

Invariants: responses have the plain OpenAI shapes (``chat.completion``, ``chat.completion.chunk``,
``text_completion``, ids ``id-<epoch ms>``); errors use the Workers AI envelope (a stream that fails after its
headers ends with one frame carrying both ``error`` and the envelope's ``errors``); a parameter airun does not
implement is refused with 400/5006 naming it, never ignored; a stream ends with ``data: [DONE]`` after the chunk with
``finish_reason`` (and, with ``stream_options.include_usage``, a last chunk with empty ``choices`` and the usage).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from airun.engine.outputs import RequestOutput
from airun.errors import InvalidRequestError
from airun.sampling_params import SamplingParams
from airun.server.body import check_unicode
from airun.server.errors import ApiError, bad_input, lora_unsupported, request_id_of, unknown_model
from airun.server.finetunes import split_lora
from airun.server.generation import ClientDisconnected, Generation
from airun.server.inputs import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, PART_JOIN, chat_prompt_ids
from airun.server.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelList,
    SamplingFields,
    TextCompletion,
    unsupported,
)
from airun.server.schemas import SSE_CONTENT, error_responses
from airun.server.sse import DONE_FRAME, SSEResponse, frame
from airun.server.state import AppState, app_state
from airun.server.workers_ai import CLIENT_GONE_STATUS, check_account, usage

MAX_STOP_STRINGS = 16
router = APIRouter(tags=["OpenAI-compatible"])
ERRORS = error_responses(400, 401, 404, 408, 413, 429, 500, 503)


def completion_id() -> str:
    return f"id-{int(time.time() * 1000)}"


def model_aliases(state: AppState) -> set[str]:
    assert state.model is not None
    name = state.model.name
    source = state.model.source_name
    aliases = {name, name.removeprefix("@hf/"), name.rsplit("/", 1)[-1], source, PurePath(source).name,
               *state.settings.extra_model_aliases}
    return {a.casefold() for a in aliases if a}


def resolve_model(state: AppState, requested: str | None) -> str:
    """The served name for the model a request names (the served name, its last part, or the source it was loaded
    from); None means the served model. Unknown -> 400/5007."""
    assert state.model is not None
    if requested is None or requested.casefold() in model_aliases(state):
        return state.model.name
    raise unknown_model(requested)


def sampling_of(req: SamplingFields, max_tokens: int | None, rid: str | None) -> SamplingParams:
    reason = unsupported(req)
    if reason is not None:
        raise bad_input(reason, rid)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
        raise bad_input(f"'stop' must be at most {MAX_STOP_STRINGS} non-empty strings", rid)
    return SamplingParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_k=max(0, req.top_k or 0),
        top_p=1.0 if req.top_p is None else req.top_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
    )


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        text = m.content if isinstance(m.content, str) else PART_JOIN.join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _stream_error(err: ApiError, request_id: str) -> bytes:
    payload = err.payload(request_id)
    payload["error"] = {"message": payload["errors"][0]["message"], "type": "server_error", "code": err.code}
    return frame(payload)


async def _frames(gen: Generation, first: RequestOutput, chunk: Callable[..., dict[str, Any]],
                  include_usage: bool, opening: dict[str, Any] | None) -> AsyncIterator[bytes]:
    """``chunk(text, finish_reason)`` builds one chunk; ``opening`` (chat: the role delta) goes first."""
    async with contextlib.aclosing(gen.stream(first)) as outputs:
        try:
            if opening is not None:
                yield frame(opening)
            async for out in outputs:
                if out.text:
                    yield frame(chunk(out.text, None))
                if out.finished:
                    yield frame(chunk(None, _finish(out.finish_reason)))
                    if include_usage:
                        yield frame(chunk(None, None, usage(out.num_prompt_tokens, out.num_output_tokens)))
                    yield DONE_FRAME
                    return
        except ApiError as err:  # headers are gone: the failure travels as a last frame, then [DONE]
            yield _stream_error(err, gen.request_id)
            yield DONE_FRAME


def model_and_lora(state: AppState, req: SamplingFields, rid: str | None) -> tuple[str, str | None]:
    """The served model and the adapter a request names (``model: "base:adapter"`` or ``lora``)."""
    try:
        requested, lora = split_lora(req.model, req.lora, model_aliases(state))
    except InvalidRequestError as exc:
        raise bad_input(str(exc), rid) from exc
    model = resolve_model(state, requested)
    if lora and not state.settings.enable_lora:
        raise lora_unsupported(model)
    return model, lora


async def _run(request: Request, req: SamplingFields, ids: list[int], sampling: SamplingParams, model: str,
               kind: str, lora: str | None = None) -> Response:
    state = app_state(request)
    rid = request_id_of(request) or ""
    gen = Generation(state, request, ids, sampling, rid, lora)
    oid, created = completion_id(), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chat = kind == "chat"

    def chunk(text: str | None, finish: str | None, use: dict[str, int] | None = None) -> dict[str, Any]:
        base: dict[str, Any] = {"id": oid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": model}
        if use is not None:
            base["choices"] = []
            base["usage"] = use
            return base
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text is not None else {},
                                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        base["choices"] = [choice]
        if include_usage:
            base["usage"] = None
        return base

    try:
        if req.stream:
            first = await gen.first()
            opening = None
            if chat:
                opening = chunk("", None)
                opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return SSEResponse(_frames(gen, first, chunk, include_usage, opening))  # type: ignore[return-value]
        done = await gen.complete()
    except ClientDisconnected:
        return Response(status_code=CLIENT_GONE_STATUS)
    body: dict[str, Any] = {"id": oid, "object": "chat.completion" if chat else "text_completion",
                            "created": created, "model": model}
    if chat:
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                            "finish_reason": _finish(done.finish_reason)}]
    else:
        body["choices"] = [{"index": 0, "text": done.text, "logprobs": None,
                            "finish_reason": _finish(done.finish_reason)}]
    body["usage"] = usage(done.prompt_tokens, done.completion_tokens)
    return JSONResponse(body)


async def chat_completions(request: Request, req: ChatCompletionRequest, account_id: str | None) -> Response:
    state = app_state(request)
    rid = request_id_of(request)
    check_account(state, request, account_id)
    engine = state.require_engine()
    model, lora = model_and_lora(state, req, rid)
    check_unicode(req.model_dump(), rid)
    sampling = sampling_of(req, req.max_completion_tokens or req.max_tokens, rid)
    ids = chat_prompt_ids(engine.tokenizer, chat_messages(req.messages))
    return await _run(request, req, ids, sampling, model, "chat", lora)


CHAT_DOC: dict[str, Any] = {
    "response_model": None,
    "responses": {
        200: {"model": ChatCompletion, "description": "A chat completion; with `stream: true`, SSE chunks.",
              "content": SSE_CONTENT},
        **ERRORS,
    },
}


@router.post("/v1/chat/completions", operation_id="chat_completions", **CHAT_DOC)
async def chat_route(request: Request, req: ChatCompletionRequest) -> Response:
    return await chat_completions(request, req, None)


@router.post("/client/v4/accounts/{account_id}/ai/v1/chat/completions", operation_id="chat_completions_account",
             **CHAT_DOC)
async def chat_account_route(request: Request, account_id: str, req: ChatCompletionRequest) -> Response:
    return await chat_completions(request, req, account_id)


@router.post(
    "/v1/completions",
    operation_id="completions",
    response_model=None,
    responses={
        200: {"model": TextCompletion, "description": "A text completion; with `stream: true`, SSE chunks.",
              "content": SSE_CONTENT},
        **ERRORS,
    },
)
async def completions_route(request: Request, req: CompletionRequest) -> Response:
    state = app_state(request)
    rid = request_id_of(request)
    engine = state.require_engine()
    model, lora = model_and_lora(state, req, rid)
    check_unicode(req.model_dump(), rid)
    sampling = sampling_of(req, req.max_tokens, rid)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise bad_input("'prompt' holds several prompts; send one prompt per request", rid)
        prompt = str(prompt[0])
    if not prompt:
        raise bad_input("'prompt' must not be empty", rid)
    if isinstance(prompt, str):
        ids = list(engine.tokenizer.encode(prompt))
    else:
        ids = [int(t) for t in prompt]
    return await _run(request, req, ids, sampling, model, "text", lora)


@router.get("/v1/models", operation_id="list_models", response_model=None,
            responses={200: {"model": ModelList}, **error_responses(401, 500, 503)})
async def list_models(request: Request) -> JSONResponse:
    state = app_state(request)
    state.require_engine()
    assert state.model is not None
    card = {"id": state.model.name, "object": "model", "created": int(time.time()), "owned_by": "airun"}
    return JSONResponse({"object": "list", "data": [card]})

