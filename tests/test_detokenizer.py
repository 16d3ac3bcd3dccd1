"""Incremental detokenization (UTF-8 boundaries, O(new tokens) windows) and stop strings across
delta boundaries. The tokenizer is a tiny byte-level BPE trained in the test, with a vocabulary
small enough that multi-byte characters are split across tokens."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.core.stopping import StopChecker
from engine.detokenizer import IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"
TRAINING_TEXT = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "héllo 世界 🙂 naïve café",
    "def add(a, b):\n    return a + b\n",
]
SAMPLE_TEXTS = [
    "héllo 世界 🙂!",
    "naïve café — 日本語のテキスト 👍🏽 done",
    "emoji run 🙂🙂🙂🎉🎉 and 한국어 text, then ascii.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    return tok


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int], chunk_sizes) -> list[str]:
    deltas, start = [], 0
    for size in chunk_sizes:
        deltas.append(detokenizer.add_tokens(ids[start:start + size]))
        start += size
    assert start >= len(ids)
    return deltas


def _random_chunks(num_ids: int, rng: random.Random) -> list[int]:
    sizes = []
    while sum(sizes) < num_ids:
        sizes.append(rng.randint(1, 4))
    return sizes


# ---------------------------------------------------------------- IncrementalDetokenizer


def test_sample_texts_split_characters_across_tokens(tokenizer):
    # Guard for the tests below: they only mean something if some prefix decodes to U+FFFD.
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert any(REPLACEMENT_CHAR in tokenizer.decode(ids[:n]) for n in range(len(ids)))


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_one_token_at_a_time_never_emits_partial_characters(tokenizer, text):
    ids = tokenizer.encode(text).ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detokenizer, ids, [1] * len(ids))
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert detokenizer.flush() == ""
    assert "".join(deltas) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_reassemble_exactly(tokenizer, seed):
    rng = random.Random(seed)
    text = " ".join(SAMPLE_TEXTS)
    ids = tokenizer.encode(text).ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detokenizer, ids, _random_chunks(len(ids), rng))
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert "".join(deltas) + detokenizer.flush() == text


def test_text_before_an_incomplete_character_is_emitted_at_once(tokenizer):
    ids = tokenizer.encode("ab 🙂").ids
    complete = max(n for n in range(len(ids)) if tokenizer.decode(ids[:n]) == "ab ")
    cut = len(ids) - 1   # the emoji is still incomplete here
    assert cut > complete
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add_tokens(ids[:cut]) == "ab "
    assert detokenizer.add_tokens(ids[cut:]) == "🙂"


def test_prompt_tail_gives_context_but_is_not_emitted(tokenizer):
    prompt_ids = tokenizer.encode("the quick brown fox says").ids
    generated_ids = tokenizer.encode(" héllo 世界 🙂").ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids_tail=prompt_ids)
    deltas = _stream(detokenizer, generated_ids, [1] * len(generated_ids))
    assert "".join(deltas) + detokenizer.flush() == tokenizer.decode(generated_ids)


def test_generation_ending_inside_a_character_is_released_by_flush(tokenizer):
    ids = tokenizer.encode("ok 🎉").ids[:-1]
    assert tokenizer.decode(ids).endswith(REPLACEMENT_CHAR)
    detokenizer = IncrementalDetokenizer(tokenizer)
    emitted = "".join(_stream(detokenizer, ids, [1] * len(ids)))
    assert REPLACEMENT_CHAR not in emitted
    assert emitted + detokenizer.flush() == tokenizer.decode(ids)


def test_invalid_bytes_are_passed_through_once_valid_text_follows(tokenizer):
    # Dropping the first token of "界" leaves bare continuation bytes: real garbage, not an
    # incomplete character. It must come out as U+FFFD once text follows, exactly as decode says.
    ids = tokenizer.encode("界").ids[1:] + tokenizer.encode("ok").ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    emitted = "".join(_stream(detokenizer, ids, [1] * len(ids)))
    assert emitted == tokenizer.decode(ids)
    assert emitted.startswith(REPLACEMENT_CHAR) and emitted.endswith("ok")


def test_skip_special_tokens(tokenizer):
    eos = tokenizer.token_to_id("<eos>")
    ids = tokenizer.encode("héllo").ids + [eos] + tokenizer.encode(" 世界").ids + [eos]
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    with_special = "".join(_stream(kept, ids, [1] * len(ids))) + kept.flush()
    without = "".join(_stream(skipped, ids, [1] * len(ids))) + skipped.flush()
    assert with_special == "héllo<eos> 世界<eos>"
    assert without == "héllo 世界"


def test_each_call_decodes_only_a_small_window(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(SAMPLE_TEXTS) * 20).ids
    assert len(ids) > 1000
    detokenizer = IncrementalDetokenizer(counting, prompt_ids_tail=ids[:500])
    text = "".join(_stream(detokenizer, ids, [1] * len(ids)))
    assert text == tokenizer.decode(ids)
    # Context (6) + a few held-back tokens of an incomplete character, whatever the length.
    assert max(counting.window_sizes) <= 12

    counting.window_sizes.clear()
    detokenizer = IncrementalDetokenizer(counting)
    detokenizer.add_tokens(ids[:800])             # one big chunk...
    detokenizer.add_tokens(ids[800:801])          # ...must not be decoded again
    assert max(counting.window_sizes[-3:]) <= 12


def test_empty_add_emits_nothing(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add_tokens([]) == ""
    assert detokenizer.flush() == ""


# ---------------------------------------------------------------- StopChecker


def _run_stop_checker(stop, chunks, include=False) -> tuple[str, bool, str | None]:
    checker = StopChecker(stop, include_stop_str_in_output=include)
    emitted = []
    for chunk in chunks:
        text, stopped, matched = checker.feed(chunk)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True, matched
    emitted.append(checker.flush())
    return "".join(emitted), False, None


def _reference_stop(stop, text, include=False) -> tuple[str, bool, str | None]:
    """Oracle: scan end positions; the first at which any stop string ends wins (longest)."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stop if text[:end].endswith(s)]
        if ending_here:
            matched = max(ending_here, key=len)
            cut = end if include else end - len(matched)
            return text[:cut], True, matched
    return text, False, None


def _random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


STOP_CASES = [
    (["</answer>"], "The result is 42.</answer> trailing"),
    (["STOP"], "STOP right at the start"),
    (["\n\n", "User:"], "line one\nline two\n\nUser: next"),
    (["abcd", "bc"], "xxabcdyy"),          # overlapping: "bc" completes first
    (["aab"], "aaaab tail"),                # a stop that overlaps itself
    (["世界", "🙂"], "héllo 世界 🙂"),
    (["never"], "no stop string here, nev"),
    (["b", "ab"], "xab"),                   # same end: the longer one wins
]


@pytest.mark.parametrize("stop, text", STOP_CASES)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_split_one_char_at_a_time(stop, text, include):
    assert _run_stop_checker(stop, list(text), include) == _reference_stop(stop, text, include)


@pytest.mark.parametrize("stop, text", STOP_CASES)
@pytest.mark.parametrize("seed", range(8))
def test_stop_strings_split_at_random(stop, text, seed):
    rng = random.Random(seed)
    include = seed % 2 == 1
    chunks = _random_split(text, rng)
    assert _run_stop_checker(stop, chunks, include) == _reference_stop(stop, text, include)


def test_stop_at_the_very_start():
    checker = StopChecker(["<|end|>"], include_stop_str_in_output=False)
    assert checker.feed("<|end|>and more") == ("", True, "<|end|>")
    assert checker.feed("ignored") == ("", True, "<|end|>")
    assert checker.flush() == ""


def test_holds_back_only_a_possible_stop_prefix():
    checker = StopChecker(["world", "wxyz"])
    assert checker.feed("hello wor") == ("hello ", False, None)
    assert checker.feed("m") == ("worm", False, None)
    assert checker.feed(" and w") == (" and ", False, None)
    assert checker.flush() == "w"
    assert checker.flush() == ""


def test_include_stop_string_in_output():
    checker = StopChecker("</end>", include_stop_str_in_output=True)
    assert checker.feed("done</e") == ("done", False, None)
    assert checker.feed("nd> extra") == ("</end>", True, "</end>")
    assert checker.stopped and checker.matched == "</end>"


def test_no_stop_strings_passes_text_through():
    checker = StopChecker([])
    assert checker.feed("anything") == ("anything", False, None)
    assert checker.flush() == ""


def test_stop_checker_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="stop"):
        StopChecker(["ok", ""])


def test_detokenizer_and_stop_checker_together(tokenizer):
    text = "héllo 世界 🙂 naïve café"
    ids = tokenizer.encode(text).ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    checker = StopChecker(["🙂"])
    emitted = []
    for token_id in ids:
        delta, stopped, matched = checker.feed(detokenizer.add_tokens([token_id]))
        emitted.append(delta)
        if stopped:
            break
    assert stopped and matched == "🙂"
    assert "".join(emitted) == "héllo 世界 "


def test_cut_releases_held_back_text_only_when_the_request_ends_without_a_stop():
    checker = StopChecker(["</end>"])
    assert checker.cut("abc</e", finished=False) == ("abc", None)  # "</e" may still become the stop
    assert checker.cut("x", finished=True) == ("</ex", None)
    stopping = StopChecker(["</end>"])
    assert stopping.cut("abc</e", finished=False) == ("abc", None)
    assert stopping.cut("nd> more", finished=True) == ("", "</end>")  # the stop wins over the other reason
