"""Streaming detokenization: the pieces joined equal the full decode, byte for byte, for Mistral's SentencePiece
tokenizer (byte fallback, leading-space strip) and the SmolLM2 byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest

from airun.text.detokenizer import IncrementalDetokenizer
from airun.text.tokenizer import Tokenizer, load_tokenizer_from_folder
from tests.fixtures_text import (
    demo_reference_tokenizer,
    demo_tokenizer,
    make_mistral_tokenizer_dir,
    mistral_spm_model_path,
)

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces   and\n\nnew\nlines\n",
    "Café naïve résumé — “quotes” ±½",
    "combining: e\u0301 a\u0300 n\u0303 o\u0308\u0301",
    "日本語のテキストと中文和한국어",
    "emoji 😀👍🏽 👨\u200d👩\u200d👧 🦀🇫🇷!",
    "😀",
    "x😀y",
    "\n",
    "  ",
    "def f(x):\n\treturn {'a': [1, 2]}\n",
]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer_from_folder(make_mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral-tok")))


@pytest.fixture(scope="module")
def spm():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_spm_model_path()))


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return demo_tokenizer()


def stream(tok: Tokenizer, ids: list[int], skip: bool = True, chunk: int = 1) -> list[str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [d.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(d.flush())
    assert d.text == "".join(pieces) and d.token_ids == ids
    return pieces


def check_text(tok: Tokenizer, text: str, reference_decode: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    for chunk in (1, 2, 3):
        pieces = stream(tok, ids, chunk=chunk)
        assert "".join(pieces) == tok.decode(ids) == reference_decode, (text, pieces)
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_mistral_stream_equals_full_decode(text: str, mistral: Tokenizer, spm) -> None:
    check_text(mistral, text, spm.decode(spm.encode(text)))


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_stream_equals_full_decode(text: str, smol: Tokenizer) -> None:
    ref = demo_reference_tokenizer()
    check_text(smol, text, ref.decode(ref.encode(text, add_special_tokens=False)))
    assert smol.decode(smol.encode(text, add_special_tokens=False)) == text  # byte-level BPE round-trips


def test_first_sentencepiece_token_loses_its_space_as_in_a_full_decode(mistral: Tokenizer) -> None:
    d = IncrementalDetokenizer(mistral)
    assert d.add_tokens([22557]) == "Hello"  # '▁Hello'
    assert d.add_tokens([1526]) == " world"  # '▁world'
    assert d.add_tokens([28705]) == " "  # '▁'
    assert d.flush() == ""
    assert d.text == "Hello world "


def test_byte_fallback_character_comes_out_whole(mistral: Tokenizer) -> None:
    # 😀 is F0 9F 98 80: four byte-fallback pieces <0xF0> <0x9F> <0x98> <0x80>, ids = byte + 3
    emoji = [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]
    assert [mistral.id_to_piece(i) for i in emoji] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    d = IncrementalDetokenizer(mistral)
    assert d.add_tokens([22557]) == "Hello"
    assert d.add_tokens([28705]) == " "
    assert [d.add_tokens([t]) for t in emoji] == ["", "", "", ""]  # the run of bytes is held until it ends
    assert d.add_tokens([1526]) == "😀 world"
    d2 = IncrementalDetokenizer(mistral)
    assert d2.add_tokens(emoji[:2]) == "" and d2.flush() == "\ufffd\ufffd"  # an unfinished character, as decode gives


def test_special_tokens_skipped_or_kept(mistral: Tokenizer, smol: Tokenizer) -> None:
    m_ids = mistral.encode("Hi there", add_special_tokens=False)
    s_ids = smol.encode("Hi there", add_special_tokens=False)
    for tok, ids, eos in ((mistral, m_ids, 2), (smol, s_ids, 2)):
        for seq in ([eos, *ids], [*ids[:1], eos, *ids[1:]], [*ids, eos], [eos, eos, *ids, eos]):
            for skip in (True, False):
                assert "".join(stream(tok, seq, skip)) == tok.decode(seq, skip), (seq, skip)
    assert "".join(stream(mistral, [22557, 2, 1526])) == "Hello world"
    assert "".join(stream(mistral, [22557, 99999, 1526])) == "Hello world"  # an id past the vocabulary decodes to ""
    assert "".join(stream(mistral, [22557, 2, 1526], skip=False)) == "Hello</s> world"


def test_flush_twice_and_add_after_flush(smol: Tokenizer) -> None:
    d = IncrementalDetokenizer(smol)
    ids = smol.encode("one two", add_special_tokens=False)
    assert d.add_tokens(ids) == "one two"
    assert d.flush() == "" and d.flush() == ""
    assert d.add_tokens([]) == ""


@pytest.mark.parametrize("which", ["mistral", "smol"])
def test_random_token_streams_equal_full_decode(which: str, mistral: Tokenizer, smol: Tokenizer) -> None:
    # what a random or badly trained model can emit: stray bytes (invalid UTF-8), special tokens, anything
    tok = mistral if which == "mistral" else smol
    rng = random.Random(1234)
    specials = sorted(tok.special_token_ids)
    byte_ids = sorted(tok.byte_token_ids)
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 24)):
            r = rng.random()
            if r < 0.1:
                ids.append(rng.choice(specials))
            elif r < 0.4 and byte_ids:
                ids.append(rng.choice(byte_ids))
            else:
                ids.append(rng.randrange(tok.vocab_size))
        for skip in (True, False):
            pieces = stream(tok, ids, skip, chunk=rng.randint(1, 3))
            assert "".join(pieces) == tok.decode(ids, skip), (ids, skip, pieces)

