"""Tokenizers rebuilt from GGUF metadata (and from SentencePiece protos), as `tokenizers` pipelines.

Two vocabularies are supported, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``"llama"``: SentencePiece BPE (Llama-2, Mistral v0.1-v0.3). Pieces with scores and types; merges are implied by
  the scores (a pair of normal pieces merges with the score of the piece it makes, best first); unknown characters
  fall back to ``<0xNN>`` byte pieces. Every run of text between special tokens gets the ``▁`` prefix, as
  SentencePiece and llama.cpp do.
- ``"gpt2"``: byte-level BPE with explicit merges; ``tokenizer.ggml.pre`` names how text is split before BPE.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from airun.errors import ModelLoadError, UnsupportedModelError
from airun.text.tokenizer import Tokenizer

log = logging.getLogger("airun.text")


class TokenType(enum.IntEnum):
    """Piece types, identical in SentencePiece protos and GGUF ``tokenizer.ggml.token_type``."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Split patterns of the byte-level pre-tokenizers airun knows, by llama.cpp's ``tokenizer.ggml.pre`` name.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_STYLE_PRE = frozenset({"default", "gpt2", "gpt-2"})  # the GPT-2 split pattern
DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact"})  # each digit alone, then the GPT-2 pattern
LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe"})
TEKKEN_PRE = frozenset({"tekken"})


def byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for llama.cpp's pre-tokenizer name ``pre``, and whether BPE skips merges for a chunk that
    is already a vocabulary entry (``ignore_merges``, Llama-3 style). UnsupportedModelError for an unknown name."""
    if pre in GPT2_STYLE_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ), False
    pattern = _LLAMA3_PATTERN if pre in LLAMA3_PRE else _TEKKEN_PATTERN if pre in TEKKEN_PRE else None
    if pattern is None:
        known = sorted(GPT2_STYLE_PRE | DIGIT_SPLIT_PRE | LLAMA3_PRE | TEKKEN_PRE)
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(known)})")
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    ), pre in LLAMA3_PRE


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id, keeping the first id of a token listed twice (the later copies can only be decoded)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        log.warning("the vocabulary lists %d tokens more than once", len(tokens) - len(vocab))
    return vocab


def _add_typed_tokens(tok: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control and unknown pieces become special tokens (skipped by ``decode(skip_special_tokens=True)``);
    user-defined pieces become added tokens, always matched whole. Each keeps its vocabulary id."""
    typed = list(zip(tokens, types, strict=True))
    special_types = (TokenType.CONTROL, TokenType.UNKNOWN)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty in special_types]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == TokenType.USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a normal piece into two normal pieces,
    ranked by the score of the merged piece (highest first), ties by its id."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == TokenType.NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, i in normal.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build_spm_backend(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    add_space_prefix: bool = True,
    remove_extra_whitespaces: bool = False,
) -> tokenizers.Tokenizer:
    """A byte-fallback BPE pipeline that encodes plain text exactly as SentencePiece BPE does with these pieces."""
    if not (len(tokens) == len(scores) == len(types)):
        raise ModelLoadError("tokenizer tokens, scores and token types differ in length")
    vocab = _first_ids(tokens)
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == TokenType.UNKNOWN), None)
    has_bytes = any(ty == TokenType.BYTE for ty in types)
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=spm_merges(tokens, scores, types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=has_bytes,
        )
    )
    steps: list[normalizers.Normalizer] = []
    if remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_space_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec: list[decoders.Decoder] = [decoders.Replace("▁", " ")]
    if has_bytes:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))  # after Fuse: only the first character of the whole text
    tok.decoder = decoders.Sequence(dec)
    _add_typed_tokens(tok, tokens, types)
    return tok


def build_byte_level_backend(
    tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str
) -> tokenizers.Tokenizer:
    """A byte-level BPE pipeline from GGUF's ``gpt2`` vocabulary: tokens spelled in the GPT-2 byte alphabet,
    merges as ``"left right"`` strings, split first as the ``pre`` pre-tokenizer says."""
    pair_list: list[tuple[str, str]] = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"malformed BPE merge {m!r} in the GGUF vocabulary")
        pair_list.append((parts[0], parts[1]))
    pre_tok, ignore_merges = byte_level_pre_tokenizer(pre)
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=_first_ids(tokens), merges=pair_list, fuse_unk=False, ignore_merges=ignore_merges)
    )
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    _add_typed_tokens(tok, tokens, types)
    return tok


# ---- GGUF ------------------------------------------------------------------------------------------------------------
def _metadata(path: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file as Python values."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def load_tokenizer_from_gguf(path: Path) -> Tokenizer:
    """The tokenizer a GGUF file carries: vocabulary, merges or scores, special tokens, ``add_bos_token`` and the
    chat template (``tokenizer.chat_template``). Raises ModelLoadError / UnsupportedModelError."""
    path = Path(path)
    meta = _metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path} carries no tokenizer (tokenizer.ggml.tokens is missing)")
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)]
    if len(types) != len(tokens):
        raise ModelLoadError(f"{path}: tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise ModelLoadError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores")
        backend = build_spm_backend(
            tokens,
            [float(s) for s in scores],
            types,
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)),
        )
        default_add_bos = True
    elif kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ModelLoadError(f"{path}: a byte-level BPE vocabulary needs tokenizer.ggml.merges")
        backend = build_byte_level_backend(tokens, merges, types, str(meta.get("tokenizer.ggml.pre", "default")))
        default_add_bos = False
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (expected 'llama' (SentencePiece) or 'gpt2' (BPE))"
        )

    def token_at(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if isinstance(i, int) and 0 <= i < len(tokens) else None

    end_of_turn_keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    extra_eos = [int(meta[k]) for k in end_of_turn_keys if isinstance(meta.get(k), int)]
    return Tokenizer(
        backend,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=token_at("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=meta.get("tokenizer.chat_template"),
        extra_eos_token_ids=extra_eos,
        name=path.name,
    )
