"""The model's tokenizer: a `tokenizers` pipeline plus the special tokens and chat template that go with it.

Encoding and decoding run on the `tokenizers` library only (never transformers) and are thread-safe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from airun.errors import ModelLoadError
from airun.text.chat_template import encode_chat

log = logging.getLogger("airun.text")

# Tokens that close a chat turn in common templates: when the model's own template uses one of them, generating it
# ends the request even where the checkpoint names another token as EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|eom_id|>")


class Tokenizer:
    """Text <-> token ids for one model.

    Invariants: ``eos_token_id in eos_token_ids`` when the model names an EOS token; every id in
    ``eos_token_ids`` and ``special_token_ids`` is below ``vocab_size``; ``encode(text, add_special_tokens=True)``
    equals ``[bos_token_id] + encode(text, add_special_tokens=False)`` when ``add_bos_token`` (and a BOS exists),
    and ``encode(text, add_special_tokens=False)`` otherwise.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        chat_template: str | None,
        extra_eos_token_ids: Iterable[int] = (),
        name: str = "",
    ) -> None:
        self.backend = backend
        self.name = name
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.bos_token_id = self._lookup(bos_token, "bos")
        self.eos_token, self.eos_token_id = self._lookup(eos_token, "eos")
        self.add_bos_token: bool = bool(add_bos_token) and self.bos_token_id is not None
        self.chat_template: str | None = chat_template or None
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        # Byte-fallback pieces '<0x00>'..'<0xFF>': the decoder turns each run of them into text as one group.
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self.byte_token_ids: frozenset[int] = (
            frozenset(i for i in byte_ids if i is not None)
            if getattr(backend.model, "byte_fallback", False)
            else frozenset()
        )
        eos_ids = {i for i in extra_eos_token_ids if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        for tok in END_OF_TURN_TOKENS:
            tid = backend.token_to_id(tok)
            if tid is not None and self.chat_template is not None and tok in self.chat_template:
                eos_ids.add(tid)
        self.eos_token_ids: set[int] = eos_ids
        self._literal: tokenizers.Tokenizer | None = None  # a copy that reads special-token text as plain text

    def _lookup(self, token: str | None, what: str) -> tuple[str | None, int | None]:
        if token is None:
            return None, None
        tid = self.backend.token_to_id(token)
        if tid is None:
            log.warning("%s token %r is not in the vocabulary of %s; ignoring it", what, token, self.name or "model")
            return None, None
        return token, tid

    # ---- encoding / decoding ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS first when the model wants one.

        ``parse_special=False`` reads special-token text (``"</s>"``) as ordinary characters, as SentencePiece does.
        """
        backend = self.backend if parse_special else self._literal_backend()
        ids: list[int] = backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token:
            return [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` as stored (``'▁Hello'``, ``'<0x0A>'``, ``'Ġworld'``), or None."""
        return self.backend.id_to_token(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def _literal_backend(self) -> tokenizers.Tokenizer:
        if self._literal is None:
            lit = tokenizers.Tokenizer.from_str(self.backend.to_str())
            lit.encode_special_tokens = True
            self._literal = lit
        return self._literal

    # ---- chat ------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The prompt token ids of a conversation, as the model's own chat template lays it out.

        Raises InvalidRequestError for malformed messages, a role order the template refuses, or a model without a
        chat template.
        """
        return encode_chat(self, messages, add_generation_prompt)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos_token={self.add_bos_token})"
        )


# ---- loading from a Hugging Face folder ------------------------------------------------------------------------------
def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _chat_template_from(folder: Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else ``chat_template`` of tokenizer_config.json (a named list picks
    ``default``)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def _adds_bos_by_itself(backend: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether the pipeline's post-processor puts BOS first (how tokenizer.json says "add_bos_token")."""
    if bos_id is None or backend.post_processor is None:
        return False
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _backend_from_sentencepiece(model_file: Path) -> tokenizers.Tokenizer:
    """Converts a SentencePiece BPE ``tokenizer.model`` with the same builder as GGUF SentencePiece vocabularies."""
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ModelLoadError(
            f"{model_file.parent} has only tokenizer.model; converting it needs the sentencepiece and protobuf "
            "packages. Install them, or provide tokenizer.json (the Hugging Face fast tokenizer)."
        ) from e
    from airun.text.gguf_tokenizer import TokenType, build_spm_backend

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ModelLoadError(f"{model_file} is not a SentencePiece BPE model; provide tokenizer.json")
    del sentencepiece
    # SentencePiece piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte (as GGUF's).
    return build_spm_backend(
        tokens=[p.piece for p in proto.pieces],
        scores=[p.score for p in proto.pieces],
        types=[TokenType(p.type) for p in proto.pieces],
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
        remove_extra_whitespaces=proto.normalizer_spec.remove_extra_whitespaces,
    )


def load_tokenizer_from_folder(path: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder.

    Reads ``tokenizer.json`` (else converts a SentencePiece ``tokenizer.model``), ``tokenizer_config.json`` for the
    bos/eos tokens, ``add_bos_token`` and the chat template (``chat_template.jinja`` wins), and
    ``generation_config.json`` for extra EOS ids. Raises ModelLoadError when no tokenizer can be built.
    """
    folder = Path(path)
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if (folder / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises plain Exception for a malformed file
            raise ModelLoadError(f"cannot load {folder / 'tokenizer.json'}: {e}") from e
    elif (folder / "tokenizer.model").is_file():
        backend = _backend_from_sentencepiece(folder / "tokenizer.model")
    else:
        raise ModelLoadError(f"no tokenizer in {folder}: expected tokenizer.json (or a SentencePiece tokenizer.model)")

    special_file = folder / "special_tokens_map.json"
    special_map = _read_json(special_file) if special_file.is_file() else {}
    bos = _token_content(config.get("bos_token", special_map.get("bos_token")))
    eos = _token_content(config.get("eos_token", special_map.get("eos_token")))
    bos_id = backend.token_to_id(bos) if bos else None
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _adds_bos_by_itself(backend, bos_id)

    extra_eos: list[int] = []
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        gen_eos = _read_json(gen_file).get("eos_token_id")
        extra_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]

    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        add_bos_token=add_bos,
        chat_template=_chat_template_from(folder, config),
        extra_eos_token_ids=extra_eos,
        name=folder.name,
    )

