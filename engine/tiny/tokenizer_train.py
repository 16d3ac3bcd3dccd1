"""Training a DeepSeek-style byte-level BPE for tiny checkpoints, the demo model and tests.

``train_tokenizer`` writes ``tokenizer.json`` + ``tokenizer_config.json`` in the layout that
engine/tokenizer.py's ``Tokenizer`` loads (spec §6 pre-tokenisation, special tokens first).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from engine.tokenizer import (
    BOS_TOKEN, EOS_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN, PAD_TOKEN, TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE, Tokenizer,
)

# Order matters: trained tokenizers give these ids 0, 1, 2, ... (BOS 0, EOS 1, pad 2 as in V4).
# As in the real V4 tokenizer only BOS, EOS and pad are flagged `special`; the others are
# added tokens with `special: false` (`Tokenizer.control_ids` holds them all).
DEEPSEEK_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN,
    "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜",
    "<｜latest_reminder｜>", "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>",
    "<｜title｜>", "<｜read_url｜>", "<｜extracted_url｜>",
    FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN,
)
FLAGGED_SPECIAL_TOKENS = frozenset({BOS_TOKEN, EOS_TOKEN, PAD_TOKEN})

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

    backend = _flag_special_like_v4(backend)
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


def _flag_special_like_v4(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """The trainer adds every token as special; keep the flag only where V4 has it."""
    spec = json.loads(backend.to_str())
    for token in spec["added_tokens"]:
        token["special"] = token["content"] in FLAGGED_SPECIAL_TOKENS
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _deepseek_config(backend: tokenizers.Tokenizer, special_tokens: Sequence[str]) -> dict:
    added = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                           "rstrip": False, "single_word": False,
                                           "special": t in FLAGGED_SPECIAL_TOKENS}
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
