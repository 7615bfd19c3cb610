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

Segments and token ids
----------------------
The neutraliser holds only for a tokenizer that matches control tokens on the exact text. One
that normalises first (NFKC makes ``［INST］`` ``[INST]``; some drop zero-width characters) could
still turn message text into a control token if the whole prompt string were tokenized.
:func:`prompt_segments` therefore gives the same prompt as ``(kind, text)`` segments (control
strings, the template's spaces and newlines, message content), and serving
(:class:`model.service.PromptEncoder`) puts the control tokens in by id and encodes the rest as
plain text only. :func:`format_prompt` is the segments joined, byte for byte.

Cleaning replies
----------------
:class:`ReplyCleaner` (and :func:`clean_reply`) cut generated text at the first control string
and drop a started one at its end, so no control fragment reaches a user, streamed or not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal

BOS: Final = "<s>"
EOS: Final = "</s>"
B_INST: Final = "[INST]"
E_INST: Final = "[/INST]"
SYS_START: Final = "<<SYS>>"
SYS_END: Final = "<</SYS>>"

#: Strings with structural meaning in the prompt; the default tokenizer has a token for each.
CONTROL_STRINGS: Final = (B_INST, E_INST, SYS_START, SYS_END, BOS, EOS)
#: Inserted after the first character of a control string found in message content.
NEUTRALISER: Final = "\u200b"

ChatMessage = Mapping[str, str]

#: What a prompt segment is: a control string of the template (``<s>``, ``[INST]``, ...), the
#: template's own spaces and newlines, or message text (neutralised, stripped as the format says).
SegmentKind = Literal["control", "layout", "content"]
Segment = tuple[SegmentKind, str]

#: The system block around the system prompt, as segments: ``B_SYS + system + E_SYS``.
B_SYS_SEGMENTS: Final[tuple[Segment, ...]] = (("control", SYS_START), ("layout", "\n"))
E_SYS_SEGMENTS: Final[tuple[Segment, ...]] = (
    ("layout", "\n"),
    ("control", SYS_END),
    ("layout", "\n\n"),
)
_SPACE: Final[Segment] = ("layout", " ")  # between [INST], content, [/INST], content and eos
B_SYS: Final = "".join(text for _, text in B_SYS_SEGMENTS)  # "<<SYS>>\n"
E_SYS: Final = "".join(text for _, text in E_SYS_SEGMENTS)  # "\n<</SYS>>\n\n"


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


def prompt_segments(
    messages: Sequence[ChatMessage], *, bos: str = BOS, eos: str = EOS
) -> list[Segment]:
    """The prompt :func:`format_prompt` writes, as ``(kind, text)`` segments in order.

    Joining the texts gives exactly :func:`format_prompt`'s string. The split lets a tokenizer
    put the template's control strings in by id and encode everything else as plain text, so no
    message text can turn into a control token whatever the tokenizer's normaliser does (see
    :class:`model.service.PromptEncoder`). Empty segments (an empty ``bos``, say) are left out.

    Raises:
        PromptFormatError: no user message, or roles out of order.
    """
    turns = [(m["role"], neutralise(m["content"])) for m in messages]
    system: str | None = None
    if turns and turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
        if not turns:
            raise PromptFormatError("a system message must be followed by a user message")
    if not turns:
        raise PromptFormatError("at least one user message is required")
    user_start: tuple[Segment, ...] = (("control", bos), ("control", B_INST), _SPACE)
    user_end: tuple[Segment, ...] = (_SPACE, ("control", E_INST))
    assistant_end: tuple[Segment, ...] = (_SPACE, ("control", eos))
    segments: list[Segment] = []
    for index, (role, content) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise PromptFormatError(
                f"message {index} has role {role!r}; roles must alternate user/assistant "
                "after an optional system message"
            )
        if index == 0 and system is not None:  # B_SYS + system + E_SYS + content, stripped
            body = _strip(
                [*B_SYS_SEGMENTS, ("content", system), *E_SYS_SEGMENTS, ("content", content)]
            )
        else:
            body = [("content", content.strip())]
        if role == "user":
            segments.extend(user_start)
            segments.extend(body)
            segments.extend(user_end)
        else:
            segments.append(_SPACE)
            segments.extend(body)
            segments.extend(assistant_end)
    return [segment for segment in segments if segment[1]]


def _strip(segments: list[Segment]) -> list[Segment]:
    """``segments`` with the whitespace at both ends of their joined text removed."""
    result = list(segments)
    for index, (kind, text) in enumerate(result):
        result[index] = (kind, text.lstrip())
        if result[index][1]:
            break
    for index in range(len(result) - 1, -1, -1):
        kind, text = result[index]
        result[index] = (kind, text.rstrip())
        if result[index][1]:
            break
    return result


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
    return "".join([text for _, text in prompt_segments(messages, bos=bos, eos=eos)])


#: A held-back start of a control string this long or longer is dropped when the reply ends;
#: a lone ``[`` or ``<`` is punctuation.
MIN_FRAGMENT: Final = 2


class ReplyCleaner:
    """Keeps control fragments out of generated text, also when it arrives piece by piece.

    The text is cut at the first control string (``[INST]``, ``</s>``, ...): what follows is the
    model writing a turn of its own. A possible start of one at the end of what has arrived
    (``[/IN``) is held back until the next piece shows whether it is one; at the end, a held
    back start of :data:`MIN_FRAGMENT` or more characters is dropped. Ordinary brackets
    (``[1]``, ``<b>``) pass unchanged, and so does the neutralised ``[\u200bINST]``, which is
    message text. Feeding the pieces and then :meth:`finish` gives what :func:`clean_reply` gives
    for their concatenation.
    """

    def __init__(self, controls: Iterable[str] = CONTROL_STRINGS) -> None:
        self.controls = tuple(sorted({c for c in controls if c}))
        self._prefixes = frozenset(c[:n] for c in self.controls for n in range(1, len(c)))
        self._longest = max((len(c) for c in self.controls), default=0)
        self._held = ""
        self._cut = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to show now."""
        if self._cut:
            return ""
        text = self._held + text
        self._held = ""
        found = [index for c in self.controls if (index := text.find(c)) >= 0]
        if found:
            self._cut = True
            return text[: min(found)]
        partial = self._partial_length(text)
        self._held = text[len(text) - partial :]
        return text[: len(text) - partial]

    def finish(self) -> str:
        """What was held back, unless it is (the start of) a control string."""
        held, self._held = self._held, ""
        return "" if self._cut or len(held) >= MIN_FRAGMENT else held

    def _partial_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that starts a control string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            if text[-length:] in self._prefixes:
                return length
        return 0


def clean_reply(text: str, controls: Iterable[str] = CONTROL_STRINGS) -> str:
    """``text`` cut at its first control string, without a control string's start at its end."""
    cleaner = ReplyCleaner(controls)
    return cleaner.feed(text) + cleaner.finish()


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
