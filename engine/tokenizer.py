"""DeepSeek-V4 tokenizer: a thin wrapper over HF ``tokenizers`` plus a trainer for tiny checkpoints.

A checkpoint directory holds ``tokenizer.json`` (byte-level BPE, added tokens matched before
pre-tokenisation) and ``tokenizer_config.json`` (bos/eos names, ``add_bos_token: false``). Prompts
from the chat encoder already contain BOS, so :meth:`Tokenizer.encode` never adds special tokens;
special-token strings inside the text still map to their single ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
FIM_BEGIN_TOKEN = "<｜fim▁begin｜>"
FIM_HOLE_TOKEN = "<｜fim▁hole｜>"
FIM_END_TOKEN = "<｜fim▁end｜>"

# Order matters: trained tokenizers give these ids 0, 1, 2, ... (BOS 0, EOS 1, pad 2 as in V4).
DEEPSEEK_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN,
    "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜",
    "<｜latest_reminder｜>", "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>",
    "<｜title｜>", "<｜read_url｜>", "<｜extracted_url｜>",
    FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN,
)

# DeepSeek-V3/V4 pre-tokenisation (spec §6): three isolated splits, then byte-level mapping.
_DIGITS_PATTERN = r"\p{N}{1,3}"
_CJK_PATTERN = "[一-龥\u3040-ゟ゠-ヿ]+"
_WORD_PATTERN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+"
)

_MODEL_MAX_LENGTH = 1048576


class Tokenizer:
    """Text <-> token ids for one checkpoint. Build it with :meth:`from_dir`."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None, eos_token: str,
                 special_tokens: dict[str, int]):
        self._backend = backend
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._special_tokens = dict(special_tokens)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
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
        return set(self._special_tokens.values())

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

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Servers keep special tokens so ``</think>`` and DSML reach the parsers."""
        ids = list(ids)
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
                raise ValueError(f"ids must be ints in [0, {self._vocab_size}), got {token_id!r}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


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


# ---------------------------------------------------------------------------------------------
# training (tiny checkpoints and tests)
# ---------------------------------------------------------------------------------------------

def deepseek_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS_PATTERN), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK_PATTERN), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                    special_tokens: Sequence[str] = DEEPSEEK_SPECIAL_TOKENS) -> Tokenizer:
    """Train a DeepSeek-style byte-level BPE on ``texts``; write ``tokenizer.json`` and
    ``tokenizer_config.json`` into ``out_dir`` and return the loaded :class:`Tokenizer`.

    ``special_tokens`` get ids 0, 1, 2, ... in the given order and must include BOS and EOS.
    ``vocab_size`` is an upper bound: BPE stops early when ``texts`` run out of pairs to merge
    (``tiny_corpus()`` fills at least 8192). Deterministic: the same texts give a byte-identical
    ``tokenizer.json``.
    """
    special_tokens = list(special_tokens)
    is_text = all(isinstance(t, str) and t for t in special_tokens)
    if not is_text or len(set(special_tokens)) != len(special_tokens):
        raise ValueError("special_tokens must be distinct non-empty strings")
    for required in (BOS_TOKEN, EOS_TOKEN):
        if required not in special_tokens:
            raise ValueError(f"special_tokens must contain {required!r}")
    byte_alphabet = len(pre_tokenizers.ByteLevel.alphabet())
    if not isinstance(vocab_size, int) or vocab_size < byte_alphabet + len(special_tokens):
        raise ValueError(f"vocab_size must be an int >= {byte_alphabet + len(special_tokens)} "
                         f"(byte alphabet + special tokens), got {vocab_size!r}")

    backend = tokenizers.Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    backend.pre_tokenizer = deepseek_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_without_special_tokens(texts, special_tokens), trainer=trainer)

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / TOKENIZER_FILE), pretty=True)
    config = _deepseek_config(backend, special_tokens)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
    return Tokenizer.from_dir(directory)


def _without_special_tokens(texts: Iterable[str], special_tokens: Sequence[str]) -> Iterator[str]:
    """Yield the text between special tokens: at inference those strings never reach BPE, so
    training on their bytes would only waste merges."""
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not a single string")
    splitter = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"texts must contain only strings, got {type(text).__name__}")
        yield from (piece for piece in splitter.split(text) if piece)


def _deepseek_config(backend: tokenizers.Tokenizer, special_tokens: Sequence[str]) -> dict:
    added = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                           "rstrip": False, "single_word": False, "special": True}
             for t in special_tokens}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": _MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
    }
