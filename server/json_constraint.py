"""JSON Output (`response_format: {"type": "json_object"}`) as a logits processor.

`JsonObjectProcessor` masks every token that cannot extend the generated content to a valid
JSON prefix, and allows EOS only once a complete top-level object has been written. The check
runs over bytes (JSON structure is ASCII; any byte >= 0x80 is fine inside a string), so tokens
that hold half a UTF-8 character are handled exactly. Token bytes are computed once per
tokenizer (`TokenTable`); the allowed set per parser state is found by walking a byte trie of
the vocabulary and is cached per state (`JsonVocabIndex`), so long strings cost one cache hit
per step.

Policies:
- The content must be one JSON object (`json_object`): no leading whitespace, nothing after
  the closing brace but EOS. Whitespace between tokens inside the object is free.
- Special tokens (`<think>`, DSML, ...) are never allowed inside JSON, so a constrained reply
  makes no tool calls.
- Thinking mode: the reasoning is left free; the constraint starts after the `</think>`
  token. A reply cut by max_tokens may therefore hold no JSON at all (as on DeepSeek, where
  `finish_reason: "length"` can cut the content).
- Nesting is capped at `MAX_DEPTH` levels.
Server side only: the processor uses tensor methods of the logits it is given and never
imports torch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

MAX_DEPTH = 32
_MASK_CACHE_SIZE = 4096

# ---------------------------------------------------------------------------- token bytes


def _byte_level_decoder() -> dict[str, int]:
    """Char -> byte of the GPT-2 byte-level alphabet used by DeepSeek's BPE vocabularies.

    Printable bytes stand for themselves; the other bytes, in order, are shifted to 256 + n.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + shifted)] = byte
            shifted += 1
    return mapping


_BYTE_DECODER = _byte_level_decoder()


class TokenTable:
    """The raw bytes of every token id of one tokenizer (built once, read-only afterwards).

    `token_bytes[i]` is what token i contributes to the decoded output (added tokens: the
    UTF-8 of their text). `is_control[i]` marks control tokens: every added token, whether or
    not its `special` flag is set (the real V4 tokenizer leaves `<think>`, `｜DSML｜`, ...
    non-special), so JSON mode can never put one inside a JSON string.
    """

    def __init__(self, tokenizer):
        control_ids = tokenizer.control_ids
        self.vocab_size: int = tokenizer.vocab_size
        self.eos_id: int = tokenizer.eos_id
        self.token_bytes: list[bytes] = []
        self.is_control: list[bool] = []
        for token_id in range(self.vocab_size):
            piece = tokenizer.id_to_token(token_id)
            control = token_id in control_ids
            if piece is not None and not control and all(c in _BYTE_DECODER for c in piece):
                data = bytes(_BYTE_DECODER[c] for c in piece)
            else:  # added tokens and non-byte-level vocabularies: their decoded text
                data = tokenizer.decode([token_id]).encode("utf-8")
            self.token_bytes.append(data)
            self.is_control.append(control)

    def token_text(self, token_id: int) -> str:
        """The token's text for logprobs (`U+FFFD` where it holds part of a character)."""
        return self.token_bytes[token_id].decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- JSON prefix automaton

# A parser state is a hashable tuple (mode, aux, stack); stack is a str of "o" (object) / "a"
# (array) frames, innermost last.
START, VALUE, KEY_OR_CLOSE, KEY, COLON, AFTER, STRING, NUMBER, LITERAL, DONE = range(10)
# NUMBER aux: where inside -?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)? we are.
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUMBER_CAN_END = (N_ZERO, N_INT, N_FRAC, N_EXP)
# STRING aux = 8 * is_key + escape state: 0 plain, 1 after backslash, 2..5 hex digits left + 1.
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

State = tuple

INITIAL_STATE: State = (START, 0, "")


def _after_value(stack: str) -> State:
    return (DONE, 0, "") if not stack else (AFTER, 0, stack)


def _start_value(byte: int, stack: str, allow_close: bool) -> State | None:
    if byte in _WS:
        return (VALUE, int(allow_close), stack)
    if byte == ord("{"):
        return (KEY_OR_CLOSE, 0, stack + "o") if len(stack) < MAX_DEPTH else None
    if byte == ord("["):
        return (VALUE, 1, stack + "a") if len(stack) < MAX_DEPTH else None
    if byte == ord("]") and allow_close:
        return _after_value(stack[:-1])
    if byte == ord('"'):
        return (STRING, 0, stack)
    if byte == ord("-"):
        return (NUMBER, N_MINUS, stack)
    if byte == ord("0"):
        return (NUMBER, N_ZERO, stack)
    if byte in _DIGITS:
        return (NUMBER, N_INT, stack)
    if byte in _LITERALS:
        return (LITERAL, _LITERALS[byte], stack)
    return None


def _after(byte: int, stack: str) -> State | None:
    if byte in _WS:
        return (AFTER, 0, stack)
    top = stack[-1]
    if byte == ord(","):
        return (KEY, 0, stack) if top == "o" else (VALUE, 0, stack)
    if (byte == ord("}") and top == "o") or (byte == ord("]") and top == "a"):
        return _after_value(stack[:-1])
    return None


def _string(byte: int, aux: int, stack: str) -> State | None:
    is_key, escape = aux & 8, aux & 7
    if escape == 0:
        if byte == ord('"'):
            return (COLON, 0, stack) if is_key else _after_value(stack)
        if byte == ord("\\"):
            return (STRING, is_key | 1, stack)
        return (STRING, aux, stack) if byte >= 0x20 else None
    if escape == 1:
        if byte == ord("u"):
            return (STRING, is_key | 5, stack)
        return (STRING, is_key, stack) if byte in _SIMPLE_ESCAPES else None
    if byte not in _HEX:
        return None
    return (STRING, is_key | (escape - 1 if escape > 2 else 0), stack)


def _number(byte: int, aux: int, stack: str) -> State | None:
    is_digit = byte in _DIGITS
    if aux == N_MINUS:
        return (NUMBER, N_ZERO if byte == ord("0") else N_INT, stack) if is_digit else None
    if aux in (N_INT, N_FRAC, N_EXP) and is_digit:
        return (NUMBER, aux, stack)
    if aux in (N_DOT, N_ESIGN):
        return (NUMBER, N_FRAC if aux == N_DOT else N_EXP, stack) if is_digit else None
    if aux == N_E:
        if byte in b"+-":
            return (NUMBER, N_ESIGN, stack)
        return (NUMBER, N_EXP, stack) if is_digit else None
    if byte == ord(".") and aux in (N_ZERO, N_INT):
        return (NUMBER, N_DOT, stack)
    if byte in b"eE" and aux in (N_ZERO, N_INT, N_FRAC):
        return (NUMBER, N_E, stack)
    # The number ends here; the byte belongs to what follows it (numbers live in containers).
    return _after(byte, stack) if aux in _NUMBER_CAN_END and stack else None


def advance(state: State, byte: int) -> State | None:
    """The state after one more byte of output, or None when no valid JSON object has this prefix."""
    mode, aux, stack = state
    if mode == STRING:
        return _string(byte, aux, stack)
    if mode == AFTER:
        return _after(byte, stack)
    if mode == VALUE:
        return _start_value(byte, stack, allow_close=bool(aux))
    if mode == NUMBER:
        return _number(byte, aux, stack)
    if mode == LITERAL:
        if byte != aux[0]:
            return None
        return (LITERAL, aux[1:], stack) if len(aux) > 1 else _after_value(stack)
    if mode == START:
        return (KEY_OR_CLOSE, 0, "o") if byte == ord("{") else None
    if mode in (KEY_OR_CLOSE, KEY):
        if byte in _WS:
            return state
        if byte == ord('"'):
            return (STRING, 8, stack)
        return _after_value(stack[:-1]) if byte == ord("}") and mode == KEY_OR_CLOSE else None
    if mode == COLON:
        if byte in _WS:
            return state
        return (VALUE, 0, stack) if byte == ord(":") else None
    return None  # DONE: nothing may follow the object


def advance_bytes(state: State | None, data: bytes) -> State | None:
    for byte in data:
        if state is None:
            return None
        state = advance(state, byte)
    return state


def is_complete(state: State | None) -> bool:
    return state is not None and state[0] == DONE


# ---------------------------------------------------------------------------- vocabulary index


@dataclass
class _TrieNode:
    children: dict
    token_ids: list


class JsonVocabIndex:
    """Allowed-token sets per parser state for one tokenizer; shared by all requests.

    Built once (a byte trie of the non-control tokens); `allowed_ids(state)` walks the trie
    from `state`, pruning a subtree as soon as its prefix is invalid, and caches the result.
    """

    def __init__(self, table: TokenTable):
        self.table = table
        self._root = _TrieNode({}, [])
        for token_id, data in enumerate(table.token_bytes):
            if table.is_control[token_id] or not data:
                continue
            node = self._root
            for byte in data:
                child = node.children.get(byte)
                if child is None:
                    child = node.children[byte] = _TrieNode({}, [])
                node = child
            node.token_ids.append(token_id)
        self._cache: dict[State, tuple[int, ...]] = {}
        self._bias_cache: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def allowed_ids(self, state: State) -> tuple[int, ...]:
        cached = self._cache.get(state)
        if cached is not None:
            return cached
        if state[0] == DONE:
            allowed = (self.table.eos_id,)
        else:
            found: list[int] = []
            pending = [(self._root, state)]
            while pending:
                node, at = pending.pop()
                for byte, child in node.children.items():
                    nxt = advance(at, byte)
                    if nxt is not None:
                        found.extend(child.token_ids)
                        if child.children:
                            pending.append((child, nxt))
            allowed = tuple(sorted(found)) or (self.table.eos_id,)
        with self._lock:
            if len(self._cache) >= _MASK_CACHE_SIZE:
                self._cache.clear()
                self._bias_cache.clear()
            self._cache[state] = allowed
        return allowed

    def bias_for(self, state: State, logits):
        """An additive mask shaped like `logits` ([V]): 0 where allowed, -inf elsewhere."""
        key = (state, logits.shape[-1], str(logits.device), logits.dtype)
        bias = self._bias_cache.get(key)
        if bias is None:
            allowed = [i for i in self.allowed_ids(state) if i < logits.shape[-1]]
            bias = logits.new_full(logits.shape, float("-inf"))
            bias[logits.new_tensor(allowed).long()] = 0.0
            with self._lock:
                self._bias_cache[key] = bias
        return bias


class JsonObjectProcessor:
    """Per-request logits processor: `(output_token_ids, logits[V]) -> logits[V]`.

    Stateful (one instance per engine request): it advances its parser over the tokens that
    arrived since the previous call. `think_end_id` set means the output starts inside the
    reasoning, which stays unconstrained until that token.
    """

    def __init__(self, index: JsonVocabIndex, think_end_id: int | None = None):
        self._index = index
        self._think_end_id = think_end_id
        self._in_reasoning = think_end_id is not None
        self._num_seen = 0
        self._state: State | None = INITIAL_STATE

    @property
    def state(self) -> State | None:
        return self._state

    def _consume(self, output_token_ids: Sequence[int]) -> None:
        table = self._index.table
        for token_id in output_token_ids[self._num_seen:]:
            if self._in_reasoning:
                self._in_reasoning = token_id != self._think_end_id
            elif self._state is not None and token_id != table.eos_id:
                data = table.token_bytes[token_id] if 0 <= token_id < table.vocab_size else b"\xff"
                self._state = advance_bytes(self._state, data)
                if self._state is None:  # only reachable if a caller bypassed the mask
                    logger.warning("JSON constraint lost track at token %d; allowing only EOS", token_id)
        self._num_seen = len(output_token_ids)

    def __call__(self, output_token_ids: Sequence[int], logits):
        self._consume(output_token_ids)
        if self._in_reasoning:
            return logits
        state = self._state if self._state is not None else (DONE, 0, "")
        return logits + self._index.bias_for(state, logits)
