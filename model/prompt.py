"""Llama-2 chat prompt formatting: the one formatter for serving, export and training.

Pure Python, no torch import, so the bot, the exporter and tests can use it cheaply.

The output is byte for byte what Meta's reference ``chat_completion`` and the Llama-2-chat
Hugging Face template produce::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {assistant_1} </s>
    <s>[INST] {user_2} [/INST]

(one line in reality; broken here for width).

Every turn starts with ``<s>``; a user turn is ``[INST] {content.strip()} [/INST]``; a finished
assistant turn is `` {content.strip()} </s>``; a system prompt goes into the first user turn.

Neutralising control strings
----------------------------
Message text can never forge structure. Before formatting, every occurrence of a control
string (``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``, ``<s>``, ``</s>``) inside message
content gets a ZERO WIDTH SPACE (U+200B) inserted after its first character, so ``[INST]`` becomes
``[\\u200bINST]``. The text still reads the same to a person and to the model, but it no longer
matches the tokenizer's control tokens, which are matched on exact strings. No replacement can
create a new control string: the inserted character appears in none of them, what precedes it is
one opening bracket, and no control string starts inside what follows it. The chat template
(:data:`CHAT_TEMPLATE`) applies the same replacement, so ``tokenizer.apply_chat_template`` and
:func:`format_prompt` agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

BOS: Final = "<s>"
EOS: Final = "</s>"
B_INST: Final = "[INST]"
E_INST: Final = "[/INST]"
B_SYS: Final = "<<SYS>>\n"
E_SYS: Final = "\n<</SYS>>\n\n"

#: Strings with structural meaning in the prompt; the default tokenizer has a token for each.
CONTROL_STRINGS: Final = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>")
#: Inserted after the first character of a control string found in message content.
NEUTRALISER: Final = "\u200b"

ChatMessage = Mapping[str, str]


class PromptFormatError(ValueError):
    """The messages do not form a valid Llama-2 dialogue."""


def neutralise(text: str) -> str:
    """Return ``text`` with every control string broken by a zero-width space (see module doc)."""
    if "[" not in text and "<" not in text:  # every control string starts with one of them
        return text
    for control in CONTROL_STRINGS:
        if control in text:
            text = text.replace(control, control[0] + NEUTRALISER + control[1:])
    return text


def format_prompt(messages: Sequence[ChatMessage], *, bos: str = BOS, eos: str = EOS) -> str:
    """Format ``messages`` as a Llama-2 chat prompt.

    ``messages`` is an optional leading ``system`` message, then alternating ``user`` and
    ``assistant`` messages starting with ``user``. Ending with a ``user`` message gives a
    generation prompt (ending in ``[/INST]``); ending with an ``assistant`` message gives a
    complete training text (ending in ``</s>``).

    Raises:
        PromptFormatError: no user message, or roles out of order.
    """
    if len(messages) == 2:  # one exchange: most training lines; the general loop costs double
        first, second = messages
        if first["role"] == "user" and second["role"] == "assistant":
            question = neutralise(first["content"]).strip()
            answer = neutralise(second["content"]).strip()
            return f"{bos}{B_INST} {question} {E_INST} {answer} {eos}"
    turns = [(m["role"], neutralise(m["content"])) for m in messages]
    if turns and turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
        if not turns:
            raise PromptFormatError("a system message must be followed by a user message")
        turns[0] = (turns[0][0], B_SYS + system + E_SYS + turns[0][1])
    if not turns:
        raise PromptFormatError("at least one user message is required")
    parts: list[str] = []
    for index, (role, content) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise PromptFormatError(
                f"message {index} has role {role!r}; roles must alternate user/assistant "
                "after an optional system message"
            )
        if role == "user":
            parts.append(f"{bos}{B_INST} {content.strip()} {E_INST}")
        else:
            parts.append(f" {content.strip()} {eos}")
    return "".join(parts)


def _jinja_neutralise(expression: str) -> str:
    for control in CONTROL_STRINGS:
        expression += f" | replace('{control}', '{control[0]}{NEUTRALISER}{control[1:]}')"
    return expression


#: The same format as a Jinja chat template, installed on the default model's tokenizer.
CHAT_TEMPLATE: Final = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% set system_message = " + _jinja_neutralise("messages[0]['content']") + " %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% if loop_messages | length == 0 %}"
    "{{ raise_exception('at least one user message is required') }}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
    "{% endif %}"
    "{% set content = " + _jinja_neutralise("message['content']") + " %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + content %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
