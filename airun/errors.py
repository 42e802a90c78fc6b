"""Exception types raised by the engine; the HTTP layer maps them to Workers AI error codes."""


class AirunError(Exception):
    """Base class of every error airun raises on purpose."""


class InvalidRequestError(AirunError, ValueError):
    """The request cannot be served as given (empty prompt, bad parameter). Maps to a 4xx."""


class ContextLengthError(InvalidRequestError):
    """Prompt tokens plus ``max_tokens`` exceed the context window the engine allows."""

    def __init__(self, num_tokens: int, limit: int, detail: str = "") -> None:
        self.num_tokens = num_tokens
        self.limit = limit
        msg = (
            f"The estimated number of input and maximum output tokens ({num_tokens}) "
            f"exceeded this model context window limit ({limit})."
        )
        super().__init__(msg + (f" {detail}" if detail else ""))


class ModelLoadError(AirunError):
    """A model source could not be found, fetched or parsed."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture or configuration is not one airun computes correctly."""


class EngineDeadError(AirunError):
    """The engine's step loop failed and stopped; no request can be served."""


class RequestAbortedError(AirunError):
    """A request failed inside the engine (a model-step exception) and was ended."""


class LoRANotSupportedError(InvalidRequestError):
    """A request named an adapter (``lora``) but the model is served without LoRA support. Workers AI code 5005."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"The model {model} does not support LoRa inference")


class FinetuneNotFoundError(InvalidRequestError):
    """No fine-tune (or ``--lora`` adapter) has this name or id. Workers AI code 3037."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Finetune {name} not found")


class FinetuneMissingFilesError(InvalidRequestError):
    """The fine-tune lacks ``adapter_config.json`` or ``adapter_model.safetensors``. Workers AI code 3039."""

    def __init__(self) -> None:
        super().__init__("Finetune is missing required files (adapter_model.safetensors and adapter_config.json)")


class InvalidAdapterError(InvalidRequestError):
    """A LoRA adapter (or an uploaded asset) is malformed or does not fit the served model; the message says why."""
