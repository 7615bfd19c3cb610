"""Prompt token ids built segment by segment, so no message text can forge structure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer

from model.prompt import CONTROL_STRINGS, prompt_segments


class PromptEncoder:
    """Prompt token ids built from :func:`model.prompt.prompt_segments`, for one tokenizer.

    The template's control strings (``<s>``, ``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``,
    ``</s>``; bos and eos are the tokenizer's own) go in as the tokenizer's ids where it has them
    as added tokens. Everything else, the template's spaces and newlines and the message text, is
    encoded with ``split_special_tokens=True``, so no message text can become a special token,
    even where the tokenizer normalises text before matching its added tokens (NFKC turns
    ``［INST］`` into ``[INST]``; a normaliser may drop the neutralising zero-width space). Added
    tokens that are not special, which ``split_special_tokens`` leaves alone, are caught after
    encoding: the text they came from is encoded again one character at a time. So the plain-text
    ids never hold a control token or any other special token (``<unk>`` aside).

    A control string the tokenizer has no token for is written as text, joined to the text
    around it (as Llama-2's own tokenizer writes ``[INST]``); there the neutraliser in the text
    is all that tells a user's ``[INST]`` from the template's.

    For ordinary text the ids equal those of the whole :func:`~model.prompt.format_prompt`
    string, since a tokenizer splits at its added tokens before anything else.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos: str = tokenizer.bos_token or ""
        self.eos: str = tokenizer.eos_token or ""
        added: dict[str, int] = tokenizer.get_added_vocab()
        controls = {*CONTROL_STRINGS, self.bos, self.eos} - {""}
        #: The control strings that have a token of their own, and its id.
        self.control_ids = {text: added[text] for text in sorted(controls) if text in added}
        special = {*self.control_ids.values(), *tokenizer.all_special_ids}
        #: Ids that plain text must never produce.
        self.forbidden_ids = frozenset(special - {tokenizer.unk_token_id})
        self._plain = _plain_text_backend(tokenizer)

    def encode(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt's token ids (raises PromptFormatError like format_prompt)."""
        ids: list[int] = []
        text: list[str] = []  # plain text since the last control token
        for kind, piece in prompt_segments(messages, bos=self.bos, eos=self.eos):
            if kind == "control" and piece in self.control_ids:
                ids += self.encode_text("".join(text))
                text.clear()
                ids.append(self.control_ids[piece])
            else:
                text.append(piece)
        ids += self.encode_text("".join(text))
        return ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as plain text: ids with no control or other special token among them."""
        if not text:
            return []
        ids = self._plain_ids(text)
        if self.forbidden_ids.isdisjoint(ids):
            return ids
        return self._encode_around_forbidden(text)

    def _encode_around_forbidden(self, text: str) -> list[int]:
        """Encode ``text`` with each stretch that made a forbidden id encoded character-wise."""
        if self._plain is None:  # no offsets: all of it, characterwise
            return self._encode_characters(text)
        encoding = self._plain.encode(text, add_special_tokens=False)
        ids: list[int] = encoding.ids
        offsets: list[tuple[int, int]] = encoding.offsets
        # Mark the characters forbidden tokens came from, and those of any token sharing one of
        # them (a normaliser can make several tokens of one character), until nothing changes.
        bad = [token in self.forbidden_ids for token in ids]
        marked = bytearray(len(text))
        while True:
            for (start, end), is_bad in zip(offsets, bad, strict=True):
                if is_bad and end > start:
                    marked[start:end] = b"\x01" * (end - start)
            widened = [
                is_bad or any(marked[start:end])
                for (start, end), is_bad in zip(offsets, bad, strict=True)
            ]
            if widened == bad:
                break
            bad = widened
        result: list[int] = []
        done_until = 0  # the marked stretches before this index are encoded already
        for token, (start, end), is_bad in zip(ids, offsets, bad, strict=True):
            if not is_bad:
                result.append(token)
            elif end > start and start >= done_until:
                first, last = start, end
                while first > done_until and marked[first - 1]:
                    first -= 1
                while last < len(text) and marked[last]:
                    last += 1
                result += self._encode_characters(text[first:last])
                done_until = last
        return [token for token in result if token not in self.forbidden_ids]

    def _encode_characters(self, text: str) -> list[int]:
        """``text`` encoded one character at a time, forbidden ids left out."""
        if not text:
            return []
        return [
            token
            for character in text
            for token in self._plain_ids(character)
            if token not in self.forbidden_ids
        ]

    def _plain_ids(self, text: str) -> list[int]:
        """``text`` encoded as plain text (special tokens' text split), as is. One text a
        call: the backend's ``encode_batch`` costs more for one (32 prompt fits 1.1 against
        2.0 ms)."""
        if self._plain is not None:
            return self._plain.encode(text, add_special_tokens=False).ids
        ids: list[int] = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]
        return ids


def _plain_text_backend(tokenizer: Any) -> Tokenizer | None:
    """A fast tokenizer's backend, copied, that encodes special tokens' text as text
    (``split_special_tokens=True`` for good); ``None`` for a slow tokenizer.

    Called directly, it skips the wrapper's per-call work (about 50 us a call, three calls and
    more a prompt: 32 prompts took 5-7 ms to submit, past the batch's 5 ms wait), and being a
    copy it leaves the tokenizer's own switch alone: the wrapper flips that one flag on its
    shared backend for each call that passes ``split_special_tokens``, under any other call
    in flight on another thread.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not isinstance(backend, Tokenizer):
        return None
    own = Tokenizer.from_str(backend.to_str())
    own.encode_special_tokens = True
    own.no_truncation()
    own.no_padding()
    return own
