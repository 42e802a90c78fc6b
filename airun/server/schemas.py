"""The shapes of the Workers AI routes: the input schema requests are validated against, and the response models that
describe the routes in the OpenAPI document.

Invariant: :func:`run_input_schema` is the published input schema of the text-generation models with only these
changes, each a statement of what this server accepts: ``raw`` may also be the string "true"/"false" (the
documentation's examples send it so); ``max_tokens`` is at least 1; ``repetition_penalty`` is above 0 (0 would divide
by zero); text parts of a message must be ``{"type": "text", "text": ...}``; each variant says ``type: object``; and
``ignore_eos`` (boolean, an airun extension) is described; ``lora`` is described in the messages variant too (the
reference says fine-tunes apply to both).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from airun.server.catalog import text_generation_schema


@cache
def _run_input_schema() -> dict[str, Any]:
    schema = text_generation_schema()["input"]
    for variant in schema["oneOf"]:
        variant["type"] = "object"
        props = variant["properties"]
        props["raw"] = {
            "anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]}],
            "default": False,
            "description": props["raw"]["description"],
        }
        props["max_tokens"]["minimum"] = 1
        rp = props["repetition_penalty"]
        rp.pop("minimum", None)
        rp["exclusiveMinimum"] = 0
        props["ignore_eos"] = {
            "type": "boolean",
            "default": False,
            "description": "airun extension: keep generating past the end-of-sequence token until max_tokens.",
        }
        if "messages" in props:
            # API.md: a request selects a fine-tune with "lora" on prompt and messages inputs alike.
            props.setdefault("lora", copy.deepcopy(schema["oneOf"][0]["properties"]["lora"]))
            parts = props["messages"]["items"]["properties"]["content"]["oneOf"][1]["items"]
            parts["required"] = ["type", "text"]
            parts["properties"]["type"]["enum"] = ["text"]
    return schema


def run_input_schema() -> dict[str, Any]:
    """The input schema of ``POST .../ai/run/{model}`` as this server enforces it (a copy)."""
    return copy.deepcopy(_run_input_schema())


# ---- response models (for the OpenAPI document; handlers build plain dicts) --------------------------------------
class ErrorItem(BaseModel):
    code: int
    message: str


class ErrorEnvelope(BaseModel):
    result: None = None
    success: bool = False
    errors: list[ErrorItem]
    messages: list[Any] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RunResult(BaseModel):
    response: str
    usage: Usage


class RunEnvelope(BaseModel):
    result: RunResult
    success: bool = True
    errors: list[ErrorItem] = Field(default_factory=list)
    messages: list[Any] = Field(default_factory=list)


class CatalogTask(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    name: str
    description: str


class CatalogProperty(BaseModel):
    property_id: str
    value: Any


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    source: int
    name: str
    description: str
    task: CatalogTask
    created_at: str
    tags: list[Any]
    properties: list[CatalogProperty]
    schema_: dict[str, Any] = Field(alias="schema")


class ResultInfo(BaseModel):
    page: int
    per_page: int
    count: int
    total_count: int


class ModelsSearchEnvelope(BaseModel):
    result: list[CatalogEntry]
    result_info: ResultInfo
    success: bool = True
    errors: list[ErrorItem] = Field(default_factory=list)
    messages: list[Any] = Field(default_factory=list)


class ModelSchema(BaseModel):
    input: dict[str, Any]
    output: dict[str, Any]


class ModelSchemaEnvelope(BaseModel):
    result: ModelSchema
    success: bool = True
    errors: list[ErrorItem] = Field(default_factory=list)
    messages: list[Any] = Field(default_factory=list)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, all with the envelope."""
    return {s: {"model": ErrorEnvelope, "description": "Error (Workers AI envelope)"} for s in statuses}


# One server-sent event (OpenAPI before 3.2: the schema of a text/event-stream describes each event).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "One JSON frame, or [DONE] last"}},
}
SSE_CONTENT: dict[str, Any] = {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}

RUN_STREAM_DESCRIPTION = (
    "With `stream: true`: `text/event-stream` frames `data: {\"response\": \"...\", \"p\": \"...\"}`, then "
    "`data: {\"response\": \"\", \"usage\": {...}}`, then `data: [DONE]`."
)
