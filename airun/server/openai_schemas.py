"""Request and response shapes of the OpenAI-compatible routes.

Invariants: a request model accepts only fields this server honours (unknown fields are refused, not ignored), with
their JSON types as given (strict: ``"0.5"`` is not a number, ``1`` is not a boolean); fields
that OpenAI defines but airun does not implement are declared only so that their neutral value (``n: 1``,
``logprobs: false``, ``echo: false``, ``best_of: 1``, empty ``logit_bias`` / ``tools``...) passes and anything else
is refused by :func:`unsupported` with a message naming the parameter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

SEED_MAX = 2**53 - 1  # exactly representable in JSON numbers (the OpenAPI document states it as a float)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="The served model name (or the path / id it was loaded from)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="airun extension; 0 or -1 turns it off")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2, description="airun extension")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="airun extension")
    lora: str | None = Field(None, description="a fine-tune (LoRA adapter) name or id; also `model: \"base:adapter\"`")
    user: str | None = None
    # Declared so that their neutral values pass; anything else is refused (see unsupported()).
    n: int | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] = Field(..., description="One prompt: text, or token ids")


def unsupported(req: SamplingFields) -> str | None:
    """The name and reason of the first parameter this server does not implement, or None."""
    if req.n not in (None, 1):
        return "'n' > 1 is not supported (one choice per request)"
    if req.logprobs not in (None, False, 0):
        return "'logprobs' is not supported"
    if req.top_logprobs not in (None, 0):
        return "'top_logprobs' is not supported"
    if req.logit_bias:
        return "'logit_bias' is not supported"
    if req.best_of not in (None, 1):
        return "'best_of' > 1 is not supported"
    if req.echo:
        return "'echo' is not supported"
    if req.suffix:
        return "'suffix' is not supported"
    if req.response_format is not None and req.response_format.type != "text":
        return f"'response_format' of type {req.response_format.type!r} (JSON mode) is not supported"
    if req.tools or req.functions:
        return "'tools' / 'functions' (tool calls) are not supported"
    if req.tool_choice not in (None, "none", "auto") or req.function_call not in (None, "none", "auto"):
        return "'tool_choice' / 'function_call' is not supported"
    return None


# ---- responses (for the OpenAPI document) ---------------------------------------------------------------------------
class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
