"""Text: tokenizers (HF folders, SentencePiece models, GGUF), chat templates and incremental detokenization."""

from airun.text.chat_template import ChatMessage, normalize_messages, render_chat_template
from airun.text.detokenizer import IncrementalDetokenizer
from airun.text.gguf_tokenizer import load_tokenizer_from_gguf
from airun.text.tokenizer import Tokenizer, load_tokenizer_from_folder

__all__ = [
    "ChatMessage",
    "IncrementalDetokenizer",
    "Tokenizer",
    "load_tokenizer_from_folder",
    "load_tokenizer_from_gguf",
    "normalize_messages",
    "render_chat_template",
]
