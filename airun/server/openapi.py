"""The OpenAPI document: FastAPI's, made to state exactly what this server accepts.

Invariants: the document names the served model (path and query ``model`` parameters, the OpenAI ``model`` field) as
the only valid value; the run route's body schema is :func:`run_input_schema` narrowed to what this server serves
(at least one message, known roles, no tools, no JSON mode, no ``lora`` without adapter support, ``max_tokens`` below
the context window); the OpenAI request schemas allow unsupported parameters only at their neutral values; errors are
documented as 400 (never FastAPI's 422, which this server does not send). The document is built once the model is
known, and rebuilt until then.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from airun.server.schemas import run_input_schema
from airun.server.state import AppState

RUN_PATH_SUFFIX = "/run/{model}"
SCHEMA_PATH_SUFFIX = "/models/schema"
_NULL = {"type": "null"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _NULL]}


def served_run_schema(state: AppState) -> dict[str, Any]:
    """The run route's body schema for the model this server runs."""
    schema = run_input_schema()
    limit = state.model.max_model_len if state.model is not None else None
    for variant in schema["oneOf"]:
        props = variant["properties"]
        if limit is not None:
            props["max_tokens"]["maximum"] = max(1, limit - 1)
        if not state.settings.enable_lora:
            props["lora"] = {**props["lora"], "maxLength": 0}
        props["response_format"] = {**props["response_format"], "not": {"required": ["type"]}}
        if "messages" in props:
            props["messages"]["minItems"] = 1
            props["messages"]["items"]["properties"]["role"]["enum"] = ["system", "user", "assistant"]
            props["tools"] = {**props["tools"], "maxItems": 0}
            props["functions"] = {**props["functions"], "maxItems": 0}
            props["raw"] = {**props["raw"], "anyOf": [{"const": False}, {"const": "false"}]}
    return schema


NEUTRAL: dict[str, dict[str, Any]] = {
    "n": {"enum": [1, None]},
    "logprobs": {"enum": [False, 0, None]},
    "top_logprobs": {"enum": [0, None]},
    "logit_bias": _nullable({"type": "object", "maxProperties": 0}),
    "best_of": {"enum": [1, None]},
    "echo": {"enum": [False, None]},
    "suffix": {"enum": ["", None]},
    "response_format": _nullable({"type": "object", "properties": {"type": {"enum": ["text"]}}, "required": ["type"]}),
    "tools": _nullable({"type": "array", "maxItems": 0}),
    "functions": _nullable({"type": "array", "maxItems": 0}),
    "tool_choice": {"enum": ["none", "auto", None]},
    "function_call": {"enum": ["none", "auto", None]},
    "stop": {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16}, _NULL]},
}


def _patch_openai_request(schema: dict[str, Any], state: AppState, vocab_size: int | None) -> None:
    props = schema.get("properties", {})
    if state.model is not None:
        props["model"] = {**_nullable({"type": "string", "enum": [state.model.name]}),
                          "description": props.get("model", {}).get("description", "")}
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                limit = max(1, state.model.max_model_len - 1)
                props[key] = _nullable({"type": "integer", "minimum": 1, "maximum": limit})
    for key, value in NEUTRAL.items():
        if key in props:
            props[key] = copy.deepcopy(value)
    if "lora" in props and not state.settings.enable_lora:
        props["lora"] = {"enum": ["", None], "description": "fine-tunes are not enabled on this server"}
    if "prompt" in props:
        ids: dict[str, Any] = {"type": "integer", "minimum": 0}
        if vocab_size is not None:
            ids["maximum"] = vocab_size - 1
        props["prompt"] = {"anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
            {"type": "array", "items": ids, "minItems": 1},
        ]}


def build_openapi(app: FastAPI, state: AppState) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    name = state.model.name if state.model is not None else None
    vocab = state.engine.model_config.vocab_size if state.engine is not None else None
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if name is not None and (path.endswith(RUN_PATH_SUFFIX) or path.endswith(SCHEMA_PATH_SUFFIX)):
                for param in op.get("parameters", []):
                    if param["name"] == "model":
                        param["schema"] = {"type": "string", "enum": [name]}
            if path.endswith(RUN_PATH_SUFFIX):
                op["requestBody"]["content"]["application/json"]["schema"] = served_run_schema(state)
    schemas = doc.get("components", {}).get("schemas", {})
    for key in ("HTTPValidationError", "ValidationError"):
        schemas.pop(key, None)
    for key in ("ChatCompletionRequest", "CompletionRequest"):
        if key in schemas:
            _patch_openai_request(schemas[key], state, vocab)
    return doc


def install_openapi(app: FastAPI, state: AppState) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build_openapi(app, state)
        if state.model is not None:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
