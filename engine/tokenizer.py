"""DeepSeek-V4 tokenizer: a thin wrapper over HF ``tokenizers`` (training: engine/tiny/tokenizer_train.py).

A checkpoint directory holds ``tokenizer.json`` (byte-level BPE, added tokens matched before
pre-tokenisation) and ``tokenizer_config.json`` (bos/eos names, ``add_bos_token: false``). Prompts
from the chat encoder already contain BOS, so :meth:`Tokenizer.encode` never adds special tokens;
added-token strings inside the text still map to their single ids.

Two id sets, because the real V4 tokenizer marks only BOS, EOS, pad (and its placeholder
tokens) ``special`` while ``<｜User｜>``, ``<think>``, ``｜DSML｜``, the FIM tokens ... are added
tokens with ``special: false``: ``special_ids`` follows the flag, ``control_ids`` holds every
added token (what JSON mode must forbid and what ``decode(skip_special_tokens=True)`` drops).
:meth:`Tokenizer.encode_prompt` encodes chat-encoder pieces: the encoder's ``Control`` pieces
become their ids, all other text is encoded with no added-token matching at all, so client
text that spells a control token stays plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
FIM_BEGIN_TOKEN = "<｜fim▁begin｜>"
FIM_HOLE_TOKEN = "<｜fim▁hole｜>"
FIM_END_TOKEN = "<｜fim▁end｜>"

class Control(str):
    """A control token placed by the chat encoder: :meth:`Tokenizer.encode_prompt` maps it to
    its single id. Text that merely spells a control token is a plain ``str``."""


class Tokenizer:
    """Text <-> token ids for one checkpoint. Build it with :meth:`from_dir`."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None, eos_token: str,
                 special_tokens: dict[str, int]):
        self._backend = backend
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._special_tokens = dict(special_tokens)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._control_ids = frozenset(backend.get_added_tokens_decoder())
        self._plain_backend = _without_added_tokens(backend)
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer vocabulary")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional) from ``path``."""
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{TOKENIZER_FILE} not found: {tokenizer_file}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_config(directory / TOKENIZER_CONFIG_FILE)
        bos_token = _token_content(config.get("bos_token", BOS_TOKEN), "bos_token")
        eos_token = _token_content(config.get("eos_token", EOS_TOKEN), "eos_token")
        if eos_token is None:
            raise ValueError(f"{TOKENIZER_CONFIG_FILE} must name an eos_token")
        special = _special_tokens_of(backend, config.get("added_tokens_decoder", {}))
        return cls(backend, bos_token, eos_token, special)

    # -- ids -----------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return None if self._bos_token is None else self._backend.token_to_id(self._bos_token)

    @property
    def eos_id(self) -> int:
        return self._backend.token_to_id(self._eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids run 0 .. vocab_size - 1)."""
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def special_ids(self) -> set[int]:
        """Ids flagged ``special`` (real V4: BOS, EOS, pad and placeholders only)."""
        return set(self._special_tokens.values())

    @property
    def control_ids(self) -> frozenset[int]:
        """Every added token (special or not): never part of ordinary text."""
        return self._control_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, special-token strings become their single ids."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with no added-token matching: control-token spellings stay text."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, pieces: Iterable[str]) -> list[int]:
        """Ids of chat-encoder pieces: ``Control`` pieces become their single id, the text runs
        between them are encoded plain. Equals ``encode("".join(pieces))`` whenever the client
        text holds no control-token spelling, because added tokens split the text there too.
        The runs are encoded in one batch, which the Rust side runs without the GIL, so a big
        prompt encoded on a worker thread does not stall the event loop."""
        parts: list[int | str] = []  # control ids and text runs, in order
        run: list[str] = []
        for piece in pieces:
            control_id = self._backend.token_to_id(piece) if isinstance(piece, Control) else None
            if control_id is None:  # plain text (or a control this vocabulary lacks)
                run.append(piece)
                continue
            if run:
                parts.append("".join(run))
                run = []
            parts.append(control_id)
        if run:
            parts.append("".join(run))
        runs = [part for part in parts if isinstance(part, str)]
        encoded = iter(self._plain_backend.encode_batch(runs, add_special_tokens=False)) if runs else iter(())
        ids: list[int] = []
        for part in parts:
            if isinstance(part, str):
                ids += next(encoded).ids
            else:
                ids.append(part)
        return ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text, in one batch that runs without the GIL (unlike ``encode``)."""
        if any(not isinstance(text, str) for text in texts):
            raise ValueError("texts must be strs")
        return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Servers keep control tokens so ``</think>`` and DSML reach the
        parsers; ``skip_special_tokens=True`` drops every control token (``control_ids``),
        not only the ones flagged special, so no ``</think>`` or EOS text leaks into plain text."""
        ids = list(ids)
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
                raise ValueError(f"ids must be ints in [0, {self._vocab_size}), got {token_id!r}")
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in self._control_ids]
        return self._backend.decode(ids, skip_special_tokens=False)


def _without_added_tokens(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of ``backend`` that matches no added token (the BPE model and its ids unchanged)."""
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _read_config(config_file: Path) -> dict:
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return config


def _token_content(value: object, key: str) -> str | None:
    """Config token fields are a string, null, or an AddedToken dict with ``content``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{TOKENIZER_CONFIG_FILE}: {key} must be a string or an object with 'content'")


def _special_tokens_of(backend: tokenizers.Tokenizer, added_tokens_decoder: dict) -> dict[str, int]:
    special = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items()
               if token.special}
    if not isinstance(added_tokens_decoder, dict):
        raise ValueError(f"{TOKENIZER_CONFIG_FILE}: added_tokens_decoder must be an object")
    for key, entry in added_tokens_decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not str(key).isdigit():
            raise ValueError(f"{TOKENIZER_CONFIG_FILE}: bad added_tokens_decoder entry {key!r}")
        if backend.token_to_id(content) != int(key):
            raise ValueError(f"{TOKENIZER_CONFIG_FILE}: added token {content!r} has id {key} but "
                             f"{TOKENIZER_FILE} gives it {backend.token_to_id(content)}")
        if entry.get("special", False):
            special[content] = int(key)
        else:
            special.pop(content, None)
    return special
