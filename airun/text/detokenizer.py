"""Streaming detokenization of generated tokens: text pieces whose concatenation is the full decode.

Technique (prefix / read offsets): tokens ``[0, read)`` have been emitted; ``[prefix, read)`` is a short window of
already-emitted tokens kept as context. On new tokens, ``decode(ids[prefix:stop])`` minus ``decode(ids[prefix:read])``
is the new text. The context matters because decoding is not additive at the edges: SentencePiece strips the leading
space of the first token of a decode (``'▁world'`` alone is ``"world"``, after ``'▁Hello'`` it is ``" world"``), and
byte tokens only make a character together.

What is held back:
- text ending in U+FFFD (an incomplete UTF-8 sequence of byte-level BPE), until later tokens complete it;
- a trailing run of SentencePiece byte-fallback tokens (``<0xF0><0x9F>...``), until a token that is not a byte ends
  it: the decoder turns a whole run into text at once, valid UTF-8 or one U+FFFD per byte, so a run's text is final
  only when the run is. A character spelled in byte tokens therefore comes out one token later.
:meth:`IncrementalDetokenizer.flush` releases everything.

Invariants: ``text == "".join(every piece returned so far)``; after ``flush()``,
``text == tokenizer.decode(token_ids, skip_special_tokens)`` for the SentencePiece (Replace/ByteFallback/Fuse/Strip or
Metaspace) and byte-level decoders. The window ``[prefix, read)`` holds a token that decodes to text, or
``prefix == 0``: a skipped special token (or an id outside the vocabulary) decodes to nothing and cannot carry the
leading-space strip. Each call decodes only the window: the
tokens since the last emitted one that decodes to text, plus any held-back run.
"""

from __future__ import annotations

from airun.text.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes the generated tokens of one request (never the prompt) as they arrive."""

    __slots__ = ("_tok", "_skip", "token_ids", "text", "_prefix", "_read")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self.text: str = ""
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens before this index have been emitted

    def add_tokens(self, token_ids: list[int]) -> str:
        """Appends ``token_ids`` and returns the new text they complete ("" while it is incomplete)."""
        self.token_ids.extend(token_ids)
        return self._emit(self._complete_end())

    def flush(self) -> str:
        """Returns whatever is still held back (an incomplete character decodes to U+FFFD, as in a full decode)."""
        return self._emit(len(self.token_ids), final=True)

    def _emit(self, stop: int, final: bool = False) -> str:
        if stop <= self._read:
            return ""
        ids, decode = self.token_ids, self._tok.decode
        before = decode(ids[self._prefix : self._read], self._skip) if self._read > self._prefix else ""
        after = decode(ids[self._prefix : stop], self._skip)
        if not final and after.endswith(REPLACEMENT_CHAR):
            return ""
        # `after` extends `before` for the decoders named in the module invariants.
        piece = after[len(before) :]
        if self._decodes_to_text(self._read, stop):
            self._prefix = self._read
        self._read = stop
        self.text += piece
        return piece

    def _is_skipped(self, token_id: int) -> bool:
        """Whether decoding drops the token: a special token when skipping them, or an id outside the vocabulary."""
        return (self._skip and token_id in self._tok.special_token_ids) or not 0 <= token_id < self._tok.vocab_size

    def _decodes_to_text(self, start: int, stop: int) -> bool:
        return any(not self._is_skipped(t) for t in self.token_ids[start:stop])

    def _complete_end(self) -> int:
        """The end of the tokens whose text is final: everything but a trailing run of byte-fallback tokens (with
        skipped special tokens inside it, which the decoder drops before grouping bytes)."""
        byte_ids = self._tok.byte_token_ids
        ids = self.token_ids
        end = len(ids)
        if not byte_ids:
            return end
        i, has_byte = end, False
        while i > self._read and (ids[i - 1] in byte_ids or self._is_skipped(ids[i - 1])):
            i -= 1
            has_byte = has_byte or ids[i] in byte_ids
        return i if has_byte else end
