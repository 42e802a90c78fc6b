"""Mistral's [INST] chat format, encoded segment by segment so that ids equal mistral-common's.

Rendering Mistral's Jinja template to one string and tokenizing it does not give mistral-common's ids: SentencePiece
puts a ``▁`` before every separately encoded segment (``[/INST]`` + ``▁Hello``), which a single string loses
(``[/INST]Hello``). mistral-common encodes each segment on its own, and so does this module:

- v1 vocabularies (Mistral-7B v0.1/v0.2, where ``[INST]`` is plain text):
  ``<s>`` + enc("[INST] " + user + " [/INST]") + enc(assistant) + ``</s>`` + enc("[INST] " + user + " [/INST]") ...
  with the system prompt folded into the FIRST user turn as ``system + "\\n\\n" + user``.
- v2/v3 vocabularies (``[INST]`` / ``[/INST]`` are control tokens, Mistral-7B v0.3):
  ``<s>`` + ``[INST]`` + enc(user) + ``[/INST]`` + enc(assistant.rstrip(" ")) + ``</s>`` ... with the system prompt
  folded into the LAST user turn.

``enc`` is SentencePiece encoding of a standalone string (a leading ``▁``, special-token text read as plain text).
Roles must alternate user/assistant after optional leading system messages (joined by a blank line, empty ones
dropped, as mistral-common does); a conversation that ends with an assistant turn ends with ``</s>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airun.errors import InvalidRequestError
from airun.text.chat_template import ChatMessage

if TYPE_CHECKING:
    from airun.text.tokenizer import Tokenizer

ROLE_ORDER_ERROR = (
    "After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."
)


def is_mistral_instruct_template(template: str) -> bool:
    """Mistral's [INST] style: [INST] turns without Llama-2's <<SYS>> block."""
    return "[INST]" in template and "<<SYS>>" not in template


def _split_system(messages: list[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """The system prompt (leading system messages joined by a blank line) and the turns after it, checked to
    alternate user/assistant starting with user."""
    n = 0
    while n < len(messages) and messages[n].role == "system":
        n += 1
    system = "\n\n".join(m.content for m in messages[:n] if m.content)
    turns = messages[n:]
    for i, m in enumerate(turns):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise InvalidRequestError(ROLE_ORDER_ERROR)
    if not turns:  # a system prompt alone: mistral-common asks with an empty user turn
        turns = [ChatMessage("user", "")]
    return system, turns


def encode_mistral_instruct(tok: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Prompt ids of ``messages`` in Mistral's [INST] format (v1, or v2/v3 when ``[INST]`` is one token)."""
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise InvalidRequestError("the [INST] chat format needs the model's BOS and EOS tokens")
    system, turns = _split_system(messages)
    begin, end = tok.piece_to_id("[INST]"), tok.piece_to_id("[/INST]")
    control = begin is not None and end is not None and {begin, end} <= tok.special_token_ids
    last_user = max(i for i, m in enumerate(turns) if m.role == "user")
    system_turn = last_user if control else 0

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False, parse_special=False)

    ids: list[int] = [tok.bos_token_id]
    for i, m in enumerate(turns):
        if m.role == "assistant":
            ids += enc(m.content.rstrip(" ") if control else m.content)
            ids.append(tok.eos_token_id)
            continue
        text = f"{system}\n\n{m.content}" if system and i == system_turn else m.content
        if control:
            ids += [begin, *enc(text), end]  # type: ignore[list-item]
        else:
            ids += enc(f"[INST] {text} [/INST]")
    return ids
