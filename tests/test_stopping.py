"""Stop rules: stop tokens and eos in vLLM's order, and stop strings found across every split into deltas."""

from __future__ import annotations

import random

import pytest

from fp4serve.sampling import SamplingParams, StopStringMatcher, check_stop_token, find_stop_string

EOS_IDS = (248046, 248044)


def test_stop_token_rules() -> None:
    plain = SamplingParams(max_tokens=10, stop_token_ids=[5])
    assert check_stop_token(plain, 1, 3, EOS_IDS) is None
    assert check_stop_token(plain, 248046, 3, EOS_IDS) == ("stop", None)
    # generation_config's extra eos ids act as stop token ids and report themselves, as in vLLM
    assert check_stop_token(plain, 248044, 3, EOS_IDS) == ("stop", 248044)
    assert check_stop_token(plain, 5, 3, EOS_IDS) == ("stop", 5)
    # the length cap is checked first
    assert check_stop_token(plain, 248046, 10, EOS_IDS) == ("length", None)
    assert check_stop_token(plain, 1, 10, EOS_IDS) == ("length", None)
    ignore = SamplingParams(ignore_eos=True, stop_token_ids=[5])
    assert check_stop_token(ignore, 248046, 3, EOS_IDS) is None
    assert check_stop_token(ignore, 248044, 3, EOS_IDS) is None
    assert check_stop_token(ignore, 5, 3, EOS_IDS) == ("stop", 5)
    assert check_stop_token(SamplingParams(), 248046, 10**6, EOS_IDS) == ("stop", None)
    assert check_stop_token(SamplingParams(min_tokens=4), 248046, 3, EOS_IDS) is None
    assert check_stop_token(SamplingParams(min_tokens=4), 248046, 4, EOS_IDS) == ("stop", None)
    assert check_stop_token(SamplingParams(), 248046, 1, ()) is None


def test_find_stop_string() -> None:
    assert find_stop_string("hello world", 5, ["o", "wor"]) == ("wor", 6)  # earliest in the text wins
    assert find_stop_string("hello world", 5, ["wor"], include_stop_str_in_output=True) == ("wor", 9)
    # a match must end inside the new characters: "hello" was already checked when it arrived
    assert find_stop_string("hello world", 3, ["hello"]) is None
    assert find_stop_string("hello world", 5, ["o w"]) == ("o w", 4)
    assert find_stop_string("hello world", 4, ["o w"]) is None
    assert find_stop_string("abc", 1, ["x"]) is None


def _run(matcher: StopStringMatcher, pieces: list[str], expected: str) -> tuple[str, str | None]:
    sent = ""
    for count, piece in enumerate(pieces, start=1):
        sent += matcher.feed(piece, count)
        # nothing sent is ever taken back: what went out is a prefix of the final text
        assert expected.startswith(sent)
        if matcher.stopped:
            break
    else:
        sent += matcher.flush()
    assert sent == matcher.text
    return sent, matcher.stop_str


def _random_splits(text: str, rng: random.Random, count: int) -> list[list[str]]:
    splits = [list(text), [text]]
    splits += [[text[:i], text[i:]] for i in range(1, len(text))]
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, min(6, len(text) - 1))))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return splits


CASES = [
    ("Hello world. STOP here", ["STOP"], "Hello world. ", "STOP"),
    ("a<|x|>b<|y|>", ["<|y|>", "<|x|>"], "a", "<|x|>"),
    ("aaab", ["aab"], "a", "aab"),
    ("no stop in this text", ["zz", "STOP"], "no stop in this text", None),
    ("line one\n\nline two", ["\n\n"], "line one", "\n\n"),
    ("émoji 🤖 then end", ["🤖"], "émoji ", "🤖"),
    ("xyxyxz", ["xyxz"], "xy", "xyxz"),
]


@pytest.mark.parametrize("text,stop,expected,matched", CASES)
def test_stop_strings_across_every_split(text: str, stop: list[str], expected: str, matched: str | None) -> None:
    rng = random.Random(text)
    for pieces in _random_splits(text, rng, 30):
        assert _run(StopStringMatcher(stop), pieces, expected) == (expected, matched)
        with_stop = expected + (matched or "")
        include = StopStringMatcher(stop, include_stop_str_in_output=True)
        assert _run(include, pieces, with_stop) == (with_stop, matched)


def test_held_back_text_and_flush() -> None:
    matcher = StopStringMatcher(["</end>"])
    # the last len("</end>") - 1 characters are held back: they could be the start of the stop string
    assert matcher.feed("abc</e") == "a"
    assert matcher.feed("x") == "b"
    assert matcher.flush() == "c</ex"
    assert matcher.text == "abc</ex" and not matcher.stopped
    assert StopStringMatcher([]).feed("free text") == "free text"
    include = StopStringMatcher(["</end>"], include_stop_str_in_output=True)
    assert include.feed("abc</e") == "abc</e"


def test_min_tokens_delays_stop_strings() -> None:
    matcher = StopStringMatcher.from_params(SamplingParams(stop=["."], min_tokens=2))
    assert matcher.feed("A.", 1) == "A."
    assert not matcher.stopped
    # vLLM looks for stop strings once there are more than min_tokens output tokens
    assert matcher.feed(" B.", 2) == " B."
    assert matcher.feed(" C. D", 3) == " C"
    assert matcher.stop_str == "." and matcher.text == "A. B. C"
