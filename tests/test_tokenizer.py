"""Tokenizer loading (HF folders, SentencePiece models, GGUF) against independent references: transformers' GGUF
tokenizer for the SmolLM2 demo model, sentencepiece itself for Mistral's v1 vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from airun.errors import ModelLoadError, UnsupportedModelError
from airun.text.gguf_tokenizer import load_tokenizer_from_gguf
from airun.text.tokenizer import Tokenizer, load_tokenizer_from_folder
from tests.fixtures_text import (
    CORPUS,
    MISTRAL_V02_CHAT_TEMPLATE,
    demo_reference_tokenizer,
    demo_tokenizer,
    make_mistral_tokenizer_dir,
    mistral_spm_model_path,
    write_mistral_gguf,
)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return demo_tokenizer()


@pytest.fixture(scope="module")
def smol_ref():
    return demo_reference_tokenizer()


@pytest.fixture(scope="module")
def spm():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_spm_model_path()))


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral-tok"))


@pytest.fixture(scope="module")
def mistral(mistral_dir: Path) -> Tokenizer:
    return load_tokenizer_from_folder(mistral_dir)


# ---- SmolLM2 GGUF (byte-level BPE, pre-tokenizer "smollm") vs transformers -------------------------------------------
def test_smollm2_gguf_encodes_like_transformers(smol: Tokenizer, smol_ref) -> None:
    for text in CORPUS:
        assert smol.encode(text, add_special_tokens=False) == smol_ref.encode(text, add_special_tokens=False), text
        assert smol.encode(text) == smol_ref.encode(text), text


def test_smollm2_gguf_decodes_like_transformers(smol: Tokenizer, smol_ref) -> None:
    for text in CORPUS:
        ids = smol_ref.encode(text, add_special_tokens=False)
        assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True)
        assert smol.decode(ids, skip_special_tokens=False) == smol_ref.decode(ids, skip_special_tokens=False)


def test_smollm2_digits_are_split_before_the_byte_level_pattern(smol: Tokenizer, smol_ref) -> None:
    # GGUF pre "smollm" = llama.cpp's starcoder-style split: every digit alone, then the GPT-2 pattern (SmolLM2's own
    # tokenizer.json: Digits(individual_digits) + ByteLevel). transformers' GGUF loader does not know "smollm" and
    # splits with the GPT-2 pattern only, which differs where spaces run into a digit: "  3" is " " + " 3" there.
    pieces = [smol.id_to_piece(i) for i in smol.encode("And  3", add_special_tokens=False)]
    assert pieces == ["And", "ĠĠ", "3"]
    assert smol_ref.convert_ids_to_tokens(smol_ref.encode("And  3", add_special_tokens=False)) == ["And", "Ġ", "Ġ", "3"]
    pieces = [smol.id_to_piece(i) for i in smol.encode("x 2024", add_special_tokens=False)]
    assert pieces == ["x", "Ġ", "2", "0", "2", "4"]


def test_smollm2_gguf_special_tokens_and_template(smol: Tokenizer, smol_ref) -> None:
    assert smol.vocab_size == len(smol_ref) == 49152
    assert (smol.bos_token, smol.bos_token_id) == (smol_ref.bos_token, smol_ref.bos_token_id) == ("<|im_start|>", 1)
    assert (smol.eos_token, smol.eos_token_id) == (smol_ref.eos_token, smol_ref.eos_token_id) == ("<|im_end|>", 2)
    assert smol.add_bos_token is False
    assert smol.eos_token_ids == {2}
    assert smol.chat_template == smol_ref.chat_template
    assert smol.special_token_ids == frozenset(range(17))  # the 17 control tokens of the vocabulary
    assert smol.byte_token_ids == frozenset()
    assert smol.id_to_piece(2) == "<|im_end|>" and smol.piece_to_id("Ġthe") == smol_ref.convert_tokens_to_ids("Ġthe")


# ---- Mistral's SentencePiece v1 vocabulary vs sentencepiece -------------------------------------------------------
def test_mistral_folder_encodes_plain_text_like_sentencepiece(mistral: Tokenizer, spm) -> None:
    for text in CORPUS:
        assert mistral.encode(text, add_special_tokens=False, parse_special=False) == spm.encode(text), text
        assert mistral.encode(text, parse_special=False) == [1, *spm.encode(text)], text


def test_mistral_folder_decodes_like_sentencepiece(mistral: Tokenizer, spm) -> None:
    for text in CORPUS:
        ids = spm.encode(text)
        assert mistral.decode(ids) == spm.decode(ids), text


def test_mistral_folder_metadata(mistral: Tokenizer) -> None:
    assert mistral.vocab_size == 32000
    assert (mistral.bos_token_id, mistral.eos_token_id, mistral.add_bos_token) == (1, 2, True)
    assert mistral.eos_token_ids == {2}
    assert mistral.chat_template == MISTRAL_V02_CHAT_TEMPLATE
    assert mistral.special_token_ids == frozenset({0, 1, 2})
    assert mistral.byte_token_ids == frozenset(range(3, 259))  # <0x00>..<0xFF>
    assert mistral.id_to_piece(13) == "<0x0A>" and mistral.id_to_piece(22557) == "▁Hello"


def test_special_token_text_is_parsed_by_default_and_literal_on_request(mistral: Tokenizer, spm) -> None:
    # the HF tokenizer turns "</s>" into EOS; SentencePiece reads it as characters
    assert mistral.encode("hi</s>", add_special_tokens=False) == [*spm.encode("hi"), 2]
    assert mistral.encode("hi</s>", add_special_tokens=False, parse_special=False) == spm.encode("hi</s>")
    assert mistral.decode([1, 22557, 2]) == "Hello"
    assert mistral.decode([1, 22557, 2], skip_special_tokens=False) == "<s> Hello</s>"


def test_spm_only_folder_is_converted_like_sentencepiece(tmp_path: Path, spm) -> None:
    shutil.copyfile(mistral_spm_model_path(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer_from_folder(tmp_path)
    for text in CORPUS:
        assert tok.encode(text, add_special_tokens=False, parse_special=False) == spm.encode(text), text
        assert tok.decode(spm.encode(text)) == spm.decode(spm.encode(text))
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (1, 2, False)  # no add_bos_token, no processor


def test_folder_settings(tmp_path: Path, mistral_dir: Path) -> None:
    shutil.copytree(mistral_dir, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]  # then the post-processor (<s> $A) decides
    cfg["eos_token"] = {"content": "</s>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")
    tok = load_tokenizer_from_folder(tmp_path)
    assert tok.add_bos_token is True and tok.encode("Hello") == [1, 22557]
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {0, 2}
    assert tok.chat_template == "{{ bos_token }}"

    cfg["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer_from_folder(tmp_path).encode("Hello") == [22557]


def test_folder_without_tokenizer_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer_from_folder(tmp_path)


# ---- SentencePiece GGUF ("llama" vocabulary) vs sentencepiece -------------------------------------------------------
def test_spm_gguf_encodes_like_sentencepiece(tmp_path: Path, spm) -> None:
    tok = load_tokenizer_from_gguf(write_mistral_gguf(tmp_path / "mistral-tok.gguf"))
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (32000, 1, 2, True)
    assert tok.chat_template == MISTRAL_V02_CHAT_TEMPLATE
    for text in CORPUS:
        ids = spm.encode(text)
        assert tok.encode(text, add_special_tokens=False, parse_special=False) == ids, text
        assert tok.encode(text, parse_special=False) == [1, *ids], text
        assert tok.decode(ids) == spm.decode(ids), text
    assert tok.encode("a</s>", add_special_tokens=False) == [*spm.encode("a"), 2]


def test_gguf_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("no-such-pre")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="no-such-pre"):
        load_tokenizer_from_gguf(tmp_path / "t.gguf")
