"""The raw bytes every token id of a tokenizer contributes to the output (`TokenTable`).

Built once per tokenizer and shared: the grammar library's vocabulary (server/grammar.py) and
the text of logprobs entries. Byte-level BPE pieces map back to their exact bytes, so a token
holding half a UTF-8 character is represented exactly; added tokens contribute the UTF-8 of their
text.
"""

from __future__ import annotations

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
    non-special), so a JSON grammar can never put one inside a JSON string.
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
