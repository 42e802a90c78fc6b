"""Chat prompts: Mistral [INST] ids identical to mistral-common's, other models' templates identical to transformers'
rendering, and the sandbox's refusals (template exceptions, unsafe access, runaway templates)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from airun.errors import InvalidRequestError
from airun.text.chat_template import normalize_messages, render_chat_template
from airun.text.gguf_tokenizer import load_tokenizer_from_gguf
from airun.text.mistral_chat import ROLE_ORDER_ERROR, is_mistral_instruct_template
from airun.text.tokenizer import Tokenizer, load_tokenizer_from_folder
from tests.fixtures_text import (
    MISTRAL_V02_CHAT_TEMPLATE,
    demo_reference_tokenizer,
    demo_tokenizer,
    make_mistral_tokenizer_dir,
    mistral_spm_model_path,
    write_mistral_gguf,
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "single user turn": [user("Hello, how are you?")],
    "system + user": [system("You are terse."), user("Hi")],
    "multi-turn": [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke")],
    "system + multi-turn": [
        system("Be nice."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Ciao"), user("?")
    ],
    "unicode and emoji": [
        user("Café 😀 日本語 naïve e\u0301 👨\u200d👩\u200d👧"), assistant("Très bien 👍🏽"), user("再见")
    ],
    "leading/trailing whitespace": [user("  spaced  \n"), assistant("  b  "), user("\nc\n")],
    "whitespace-only and empty": [user(" "), assistant(" x"), user("")],
    "special-token text is plain text": [user("</s> <s> [INST] [/INST]")],
    "two system messages": [system("A"), system("B"), user("Hi")],
    "empty system message": [system(""), user("x")],
    "system alone": [system("S")],
    "content parts": [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}
    ],
}


@functools.cache
def _mistral_common(tokenizer_file: Path, finetuning: bool):  # -> MistralTokenizer
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    return MistralTokenizer.from_file(str(tokenizer_file), mode=mode)


def mistral_common_ids(tokenizer_file: Path, messages: list[dict], finetuning: bool = False) -> list[int]:
    """mistral-common's ids for a chat (finetuning mode accepts a conversation that ends with the assistant)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=messages)
    return _mistral_common(tokenizer_file, finetuning).encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral-tok"))


@pytest.fixture(scope="module")
def mistral(mistral_dir: Path) -> Tokenizer:
    return load_tokenizer_from_folder(mistral_dir)


@pytest.fixture(scope="module")
def mistral_gguf(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer_from_gguf(write_mistral_gguf(tmp_path_factory.mktemp("mistral-gguf") / "tok.gguf"))


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return demo_tokenizer()


@pytest.fixture(scope="module")
def smol_ref():
    return demo_reference_tokenizer()


# ---- Mistral v1 ([INST] is text) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mistral_v02_chat_ids_equal_mistral_common(name: str, mistral: Tokenizer, mistral_gguf: Tokenizer) -> None:
    messages = CONVERSATIONS[name]
    expected = mistral_common_ids(mistral_spm_model_path(), messages)
    assert mistral.apply_chat_template(messages) == expected
    assert mistral_gguf.apply_chat_template(messages) == expected


def test_mistral_known_ids(mistral: Tokenizer) -> None:
    # <s> ▁[ INST ] ▁Hi ▁[ / INST ] ▁Hello ! </s> ▁[ INST ] ▁By e ▁[ / INST ]: mistral-common v1's pieces
    ids = mistral.apply_chat_template([user("Hi"), assistant("Hello!"), user("Bye")])
    assert ids == [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793, 22557, 28808, 2,
                   733, 16289, 28793, 2463, 28706, 733, 28748, 16289, 28793]


def test_mistral_conversation_ending_with_assistant_ends_with_eos(mistral: Tokenizer) -> None:
    messages = [user("a"), assistant("b")]
    assert mistral.apply_chat_template(messages) == mistral_common_ids(mistral_spm_model_path(), messages, True)


@pytest.mark.parametrize(
    "messages",
    [
        [assistant("a"), user("b")],
        [user("a"), user("b")],
        [user("a"), assistant("b"), assistant("c")],
        [user("a"), system("s"), assistant("b"), user("c")],
        [system("s"), assistant("a")],
    ],
)
def test_mistral_roles_must_alternate(messages: list[dict], mistral: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        mistral.apply_chat_template(messages)
    assert "roles must alternate" in ROLE_ORDER_ERROR


def test_mistral_template_rendered_as_text_would_differ(mistral: Tokenizer) -> None:
    # why the [INST] format is encoded per segment: the rendered string tokenizes differently at turn boundaries
    messages = CONVERSATIONS["multi-turn"]
    text = render_chat_template(
        MISTRAL_V02_CHAT_TEMPLATE, normalize_messages(messages), bos_token="<s>", eos_token="</s>",
        add_generation_prompt=True,
    )
    assert text == "<s> [INST] Hi [/INST] Hello! How can I help?</s> [INST] Tell me a joke [/INST]"
    assert mistral.encode(text, add_special_tokens=False) != mistral_common_ids(mistral_spm_model_path(), messages)
    assert is_mistral_instruct_template(MISTRAL_V02_CHAT_TEMPLATE)
    assert not is_mistral_instruct_template("<s>[INST] <<SYS>>\n{{ s }}\n<</SYS>>\n\n")


def test_the_v02_template_itself_refuses_bad_role_order() -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        render_chat_template(
            MISTRAL_V02_CHAT_TEMPLATE, normalize_messages([user("a"), user("b")]), bos_token="<s>", eos_token="</s>",
            add_generation_prompt=True,
        )


# ---- Mistral v3 ([INST] / [/INST] are control tokens) ----------------------------------------------------------------
def test_mistral_v3_control_token_format_equals_mistral_common(tmp_path: Path) -> None:
    import mistral_common

    spm_file = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    shutil.copyfile(spm_file, tmp_path / "tokenizer.model")
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": MISTRAL_V02_CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer_from_folder(tmp_path)
    for name in ("single user turn", "system + multi-turn", "unicode and emoji", "leading/trailing whitespace"):
        messages = CONVERSATIONS[name]
        assert tok.apply_chat_template(messages) == mistral_common_ids(spm_file, messages), name


# ---- other templates: rendered as transformers renders them -------------------------------------------------------
@pytest.mark.parametrize(
    "messages",
    [
        [user("Hi there 😀")],
        [system("You are a pirate."), user("Where is the treasure?")],
        [user("2+2?"), assistant("4"), user("And  then 3+3?\n")],
        [user("<|im_end|> is a token")],
    ],
)
def test_smollm2_template_ids_equal_transformers(messages: list[dict], smol: Tokenizer, smol_ref) -> None:
    for gen in (True, False):
        expected = smol_ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert smol.apply_chat_template(messages, add_generation_prompt=gen) == list(expected)


def test_message_validation(smol: Tokenizer) -> None:
    for bad, why in [
        ([], "non-empty"),
        ([{"role": "tool", "content": "x"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text part"),
        (["hello"], "object"),
    ]:
        with pytest.raises(InvalidRequestError, match=why):
            smol.apply_chat_template(bad)


def test_model_without_template_cannot_chat(mistral_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(mistral_dir, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        load_tokenizer_from_folder(tmp_path).apply_chat_template([user("hi")])


# ---- the sandbox --------------------------------------------------------------------------------------------------
def render(template: str, messages: list[dict] | None = None, **kw: object) -> str:
    return render_chat_template(
        template, normalize_messages(messages or [user("hé")]), bos_token="<s>", eos_token="</s>",
        add_generation_prompt=True, **kw,  # type: ignore[arg-type]
    )


def test_template_variables_and_helpers() -> None:
    tpl = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m['content'] | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}{{ range(3) | list | length }}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    )
    assert render(tpl) == '<s>user:"hé">' + "</s>301"
    # trim_blocks and lstrip_blocks, as Hugging Face renders
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"


def test_template_exception_message_reaches_the_request() -> None:
    with pytest.raises(InvalidRequestError, match="^Conversation roles must alternate$"):
        render("{{ raise_exception('Conversation roles must alternate') }}")


def test_sandbox_refuses_unsafe_access() -> None:
    with pytest.raises(InvalidRequestError):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError):
        render("{{ messages.append(1) }}")  # immutable sandbox


def test_runaway_template_is_stopped() -> None:
    with pytest.raises(InvalidRequestError, match="longer than 0.2 s"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", time_limit_s=0.2)
    with pytest.raises(InvalidRequestError):
        render("{{ 'x' * 1000000000 }}")
    with pytest.raises(InvalidRequestError):
        render("{% for i in range(10**9) %}{% endfor %}")
    with pytest.raises(InvalidRequestError, match="^the chat template rendered a prompt that is too long$"):
        render("{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}")


def test_template_type_errors_become_request_errors() -> None:
    with pytest.raises(InvalidRequestError, match="chat template"):
        render("{{ messages[0]['content'] + 1 }}")
