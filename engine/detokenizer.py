"""Incremental detokenization: token ids → stable text deltas.

`IncrementalDetokenizer` turns a growing list of generated ids into text deltas without ever
emitting half a UTF-8 character. It knows nothing about the model, stopping or the wire (stop
strings: engine/core/stopping.py).
"""

from __future__ import annotations

from typing import Iterable, Protocol

REPLACEMENT_CHAR = "\ufffd"
# Tokens already emitted that are decoded again in front of the new ones, so that decoders which
# depend on context (leading-space rules, a character split across tokens) see what precedes.
CONTEXT_TOKENS = 6
# An incomplete UTF-8 character has at most 3 of its bytes present, so with byte-level tokens its
# first byte sits in one of the last 3 tokens; one more allows for a token that decodes to "".
MAX_INCOMPLETE_CHAR_TOKENS = 4


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a small window of recent tokens per call (the prefix/read offset technique).

        ids:  ... emitted ... | context | emitted last time | new, not yet emitted
                              ^prefix_offset              ^read_offset

    `_prefix_text` is decode(ids[prefix_offset:read_offset]); the text of the window beyond it is
    new. A window whose decode ends in U+FFFD ends inside a character: its text is emitted only up
    to the last token boundary that decodes cleanly, the rest waits for the next tokens (or
    `flush`). Cost per call is O(new tokens + CONTEXT_TOKENS), except while a run of invalid
    bytes keeps the window's end unclean; that run is held back until valid text follows it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids_tail: Iterable[int] = (),
                 skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids_tail)[-CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def add_tokens(self, new_ids: Iterable[int]) -> str:
        """Appends generated ids; returns the text that became stable (possibly "")."""
        new_ids = list(new_ids)
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        end = len(self._ids)
        text = self._decode(self._ids[self._prefix_offset:end])
        if not text.endswith(REPLACEMENT_CHAR):
            return self._advance(end, text)
        # The window ends inside a character: emit up to the latest clean token boundary.
        lowest_split = max(self._read_offset + 1, end - MAX_INCOMPLETE_CHAR_TOKENS)
        for split in range(end - 1, lowest_split - 1, -1):
            text = self._decode(self._ids[self._prefix_offset:split])
            if not text.endswith(REPLACEMENT_CHAR):
                return self._advance(split, text)
        return ""

    def flush(self) -> str:
        """End of generation: returns whatever is still held back, incomplete characters included."""
        end = len(self._ids)
        if end == self._read_offset:
            return ""
        return self._advance(end, self._decode(self._ids[self._prefix_offset:end]))

    def _advance(self, new_read_offset: int, window_text: str) -> str:
        """Emits window_text beyond the already-emitted prefix; moves the window to new_read_offset."""
        if len(window_text) < len(self._prefix_text):
            # A decoder cleaned up text across the boundary; wait for more tokens to settle it.
            return ""
        delta = window_text[len(self._prefix_text):]
        self._prefix_offset = max(self._read_offset, new_read_offset - CONTEXT_TOKENS)
        self._read_offset = new_read_offset
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
