"""Exact replay of generated tool calls: a reply's tool-call ids -> what the model generated.

When a chat reply carries tool calls, what the model generated after its reasoning (content and
DSML block, EOS excluded) is remembered under the calls' ids, as prompt pieces: its control
tokens as `Control`s, the text between them plain, so `Tokenizer.encode_prompt` gives the
generated tokens back. When a later request passes that assistant turn back — the same ids in
the same order, the same function names, arguments equal as JSON, the same content — the
encoder renders the remembered pieces instead of re-serialising the calls, so the prompt
continues the cached end-of-output unit token for token. Without it, any difference between the generated DSML and its re-rendering (arguments a
client re-dumped as `{"a":1}`, whitespace between DSML tags the parser accepts, a number spelled
`1.50`) cost the cache hit from that point on.

Bounded memory: at most `max_entries` replies and `max_chars` characters of text, least recently
used dropped first; a forgotten id renders as before (only the cache hit is lost). A record is
used only when everything the client sent back matches it, so an edited call renders as edited.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GeneratedToolTurn:
    """One reply with tool calls, as returned to the client and as generated."""

    call_ids: tuple[str, ...]
    names: tuple[str, ...]
    arguments: tuple[Any, ...]  # decoded JSON of each call's arguments
    content: str
    pieces: tuple[str, ...]  # everything the model generated after its reasoning, up to EOS

    @property
    def num_chars(self) -> int:
        return sum(len(piece) for piece in self.pieces)


def _decoded(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments  # not JSON: compared as the raw string


class ToolCallReplay:
    """Thread-safe LRU of generated tool-call turns by their first call id."""

    def __init__(self, max_entries: int = 4096, max_chars: int = 16 << 20):
        if max_entries < 1 or max_chars < 1:
            raise ValueError("max_entries and max_chars must be >= 1")
        self.max_entries, self.max_chars = max_entries, max_chars
        self._turns: OrderedDict[str, GeneratedToolTurn] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._turns)

    def remember(self, calls: list[dict], content: str, pieces: list[str]) -> None:
        """`calls`: the reply's `tool_calls` as sent ({id, function: {name, arguments}})."""
        turn = GeneratedToolTurn(tuple(c["id"] for c in calls), tuple(c["function"]["name"] for c in calls),
                                 tuple(_decoded(c["function"]["arguments"]) for c in calls), content or "",
                                 tuple(pieces))
        if not calls or turn.num_chars > self.max_chars:
            return
        with self._lock:
            self._drop(turn.call_ids[0])
            self._turns[turn.call_ids[0]] = turn
            self._chars += turn.num_chars
            while len(self._turns) > self.max_entries or self._chars > self.max_chars:
                self._drop(next(iter(self._turns)))

    def generated_pieces(self, message: dict) -> list[str] | None:
        """The remembered pieces for an assistant message passed back unchanged, else None."""
        calls = message.get("tool_calls")
        if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
            return None
        with self._lock:
            turn = self._turns.get(calls[0].get("id"))
            if turn is None:
                return None
            self._turns.move_to_end(turn.call_ids[0])
        functions = [c.get("function") if isinstance(c.get("function"), dict) else {} for c in calls]
        matches = (
            tuple(c.get("id") for c in calls) == turn.call_ids
            and tuple(f.get("name") for f in functions) == turn.names
            and tuple(_decoded(f.get("arguments")) for f in functions) == turn.arguments
            and (message.get("content") or "") == turn.content
        )
        return list(turn.pieces) if matches else None

    def _drop(self, key: str) -> None:
        turn = self._turns.pop(key, None)
        if turn is not None:
            self._chars -= turn.num_chars
