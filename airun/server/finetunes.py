"""The Workers AI fine-tune routes (create, list, upload an asset) and the LoRA errors' place in the error table.

Invariants: fine-tunes live in the engine's registry (``--data-dir``); an upload is validated (on its own, and against
the served model once both assets are there) before it replaces anything, and a refused one leaves nothing on disk;
``lora`` errors map to 5005 (405), 3037 (404) and 3039 (400), a malformed adapter to 400/5006 at upload and 400/3010
when a request names it.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from airun.errors import (
    FinetuneMissingFilesError,
    FinetuneNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    LoRANotSupportedError,
)
from airun.lora.registry import FinetuneRegistry, default_data_dir
from airun.server.body import read_json_body
from airun.server.errors import ApiError, bad_input, envelope, lora_unsupported, request_id_of
from airun.server.schemas import error_responses
from airun.server.state import AppState, app_state

router = APIRouter(tags=["Fine-tunes"])
PREFIX = "/client/v4/accounts/{account_id}/ai/finetunes"
ERRORS = error_responses(400, 401, 404, 413, 500, 503)


def finetune_not_found(name: str) -> ApiError:
    return ApiError(404, 3037, f"Finetune {name} not found")


def finetune_missing_files() -> ApiError:
    return ApiError(400, 3039, "Finetune is missing required files (adapter_model.safetensors and adapter_config.json)")


def lora_error(exc: BaseException, served_name: str | None) -> ApiError | None:
    """The ApiError of a LoRA failure the engine raised (None for any other exception)."""
    if isinstance(exc, LoRANotSupportedError):
        return lora_unsupported(served_name or exc.model)
    if isinstance(exc, FinetuneNotFoundError):
        return finetune_not_found(exc.name)
    if isinstance(exc, FinetuneMissingFilesError):
        return finetune_missing_files()
    return None


def split_lora(model: str | None, lora: str | None, aliases: set[str]) -> tuple[str | None, str | None]:
    """The OpenAI routes' ``model`` may name an adapter as ``base:adapter``; returns (base model, adapter). A ``model``
    that is itself a served name (even with a colon in it) names no adapter; ``lora`` and an adapter in ``model`` must
    agree."""
    adapter = None
    if model is not None and model.casefold() not in aliases and ":" in model:
        model, adapter = model.rsplit(":", 1)
    if adapter and lora and adapter != lora:
        raise InvalidRequestError(f"model names the adapter {adapter!r} but lora is {lora!r}")
    return model, (adapter or lora or None)


def registry_of(state: AppState) -> FinetuneRegistry:
    """The engine's fine-tune registry (its ``--data-dir``), also when the engine serves without LoRA."""
    engine = state.require_engine()
    core = getattr(engine, "engine", None)
    resolver = getattr(core, "lora_resolver", None)
    if resolver is not None and resolver.registry is not None:
        return resolver.registry
    args = getattr(core, "args", None)
    data_dir = getattr(args, "data_dir", None)
    return FinetuneRegistry(data_dir or default_data_dir(), max_rank=getattr(args, "max_lora_rank", 32))


def _refused(exc: Exception, rid: str | None) -> ApiError:
    if isinstance(exc, FinetuneNotFoundError):
        return finetune_not_found(exc.name)
    if isinstance(exc, FinetuneMissingFilesError):
        return finetune_missing_files()
    return bad_input(str(exc), rid)


@router.post(PREFIX, operation_id="create_finetune", summary="Create a fine-tune (its assets are uploaded next)",
             response_model=None, responses=ERRORS)
async def create_finetune(request: Request, account_id: str) -> JSONResponse:
    state = app_state(request)
    rid = request_id_of(request)
    body = await read_json_body(request, rid)
    if not isinstance(body, dict):
        raise bad_input("the body must be a JSON object {model, name, description, public}", rid)
    unknown = sorted(set(body) - {"model", "name", "description", "public"})
    if unknown:
        raise bad_input(f"unknown fields {unknown}", rid)
    reg = registry_of(state)
    try:
        ft = await asyncio.to_thread(reg.create, body.get("model"), body.get("name"), body.get("description") or "",
                                     body.get("public", False))
    except InvalidRequestError as exc:
        raise bad_input(str(exc), rid) from exc
    return JSONResponse(envelope(ft.to_json()))


@router.get(PREFIX, operation_id="list_finetunes", summary="List the fine-tunes", response_model=None,
            responses=ERRORS)
async def list_finetunes(request: Request, account_id: str) -> JSONResponse:
    reg = registry_of(app_state(request))
    return JSONResponse(envelope([f.to_json() for f in await asyncio.to_thread(reg.list)]))


@router.post(PREFIX + "/{finetune_id}/finetune-assets", operation_id="upload_finetune_asset",
             summary="Upload adapter_config.json or adapter_model.safetensors (multipart: file_name, file)",
             response_model=None, responses=ERRORS)
async def upload_asset(request: Request, account_id: str, finetune_id: str) -> JSONResponse:
    state = app_state(request)
    rid = request_id_of(request)
    reg = registry_of(state)
    engine = state.require_engine()
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise bad_input("send the asset as multipart/form-data with the fields file_name and file", rid)
    form = await request.form(max_files=1, max_fields=4)
    try:
        file_name, upload = form.get("file_name"), form.get("file")
        if not isinstance(file_name, str) or not file_name:
            raise bad_input("the field file_name is missing", rid)
        if not isinstance(upload, UploadFile):
            raise bad_input("the field file is missing (a file part)", rid)
        try:
            await asyncio.to_thread(reg.put_asset, finetune_id, file_name, upload.file, engine.model_config)
        except (InvalidAdapterError, InvalidRequestError) as exc:
            raise _refused(exc, rid) from exc
    finally:
        await form.close()
    return JSONResponse(envelope({"success": True}))
