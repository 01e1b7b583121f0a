"""Tokenizer: ids and decoding match transformers on the real Qwen3.5 tokenizer; streaming decode is exact."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest

from fp4serve.tokenizer import IncrementalDetokenizer, Tokenizer

REFERENCE_TEXT = "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
REFERENCE_IDS = [
    248045,
    846,
    198,
    9419,
    11,
    1204,
    513,
    488,
    30,
    248046,
    198,
    248045,
    74455,
    198,
    248068,
    271,
    248069,
    271,
]

TEXTS = [
    "",
    "Hello, world!",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune...",
    "  leading spaces and trailing   \n\n\n  ",
    "tabs\tand\r\nwindows line ends\r\n",
    "数字 12345 and 3.14159; 東京は日本の首都です。中文测试",
    "한국어 텍스트, русский текст, ελληνικά, עברית, العربية",
    "emoji 🤖👍🏽👨‍👩‍👧‍👦 🇫🇷 flags",
    "combining: e\u0301 a\u0300\u0301b x\u0308\u0308y नमस्ते ไทย",
    "NFC vs NFD: \u00c5 A\u030a \u212b ﬁ",
    "<think>\nreasoning\n</think>\n\n<tool_call>\n<function=f>\n<parameter=s>\nParis\n</parameter>\n</function>\n</tool_call>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|endoftext|><|vision_start|><|image_pad|><|vision_end|>",
    "code: def f(x):\n    return {'k': [1, 2, 3]}  # comment\n",
    "Ġ Ċ weird byte-level lookalikes ĠĠ",
]


@pytest.fixture(scope="module")
def tok_dir(shared_dir: Path) -> Path:
    return shared_dir / "assets" / "qwen3_5_tokenizer"


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path):
    """transformers' fast tokenizer built straight from tokenizer.json (the file's own pre-tokenizer)."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_auto(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_reference_ids(tok: Tokenizer) -> None:
    assert tok.encode(REFERENCE_TEXT) == REFERENCE_IDS
    assert tok.decode(REFERENCE_IDS, skip_special_tokens=False) == REFERENCE_TEXT


def test_special_tokens_and_eos(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == (248046,)
    assert tok.eos_token_id == 248046
    assert tok.pad_token_id == 248044
    assert tok.vocab_size == 248077
    expected = {
        "<|endoftext|>": 248044,
        "<|im_start|>": 248045,
        "<|im_end|>": 248046,
        "<|image_pad|>": 248056,
        "<tool_call>": 248058,
        "</tool_call>": 248059,
        "<think>": 248068,
        "</think>": 248069,
    }
    for token, token_id in expected.items():
        assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(token_id) == token
    assert tok.token_to_id("no-such-token") is None
    assert {248044, 248045, 248046, 248056} <= tok.special_token_ids
    assert not {248058, 248059, 248068, 248069} & tok.special_token_ids


def test_skip_special_tokens_keeps_think_and_tool_call(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>x</tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids) == "assistant\n<think>\nhm\n</think>\n\n<tool_call>x</tool_call>"
    assert tok.decode(ids, skip_special_tokens=False).endswith("</tool_call><|im_end|><|endoftext|>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_auto_tokenizer_agrees_except_combining_marks(tok: Tokenizer, hf_auto) -> None:
    # transformers 5 rebuilds Qwen2Tokenizer with Qwen2's pre-tokenizer regex (no \\p{M}), while Qwen3.5's
    # tokenizer.json (which we follow, see qwen3_5_arch.md section 12) keeps combining marks inside words
    for text in TEXTS:
        if text.startswith("combining"):
            continue
        assert tok.encode(text) == hf_auto.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == hf_auto.decode(tok.encode(text), skip_special_tokens=True)
    assert tok.encode("नमस्ते") == [58069, 84237, 150104, 153348]
    assert hf_auto.encode("नमस्ते", add_special_tokens=False) == [58069, 84237, 75681, 196965, 33228]


def test_random_ids_decode_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(0, tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_token_bytes_concatenate_to_text(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        # the normaliser is NFC, so that is the text that comes back
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == unicodedata.normalize("NFC", text)
    assert tok.token_bytes(248300) == b""  # padded embedding row, not a token


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, skip: bool) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas, pos = [], 0
    while pos < len(ids):
        step = rng.choice([1, 1, 1, 2, 3, 7])
        deltas.append(detok.feed(ids[pos : pos + step]))
        pos += step
    deltas.append(detok.flush())
    assert detok.num_tokens == len(ids)
    assert detok.text == "".join(deltas)
    return deltas, detok.text


def test_incremental_random_ids_join_to_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(1)
    # byte tokens (ids < 256) are mostly partial utf-8; mixing them in makes broken and completed characters common
    pools = [list(range(256)), list(range(248044, 248077)), list(range(256, 248044))]
    for trial in range(300):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randrange(0, 30))]
        skip = trial % 2 == 0
        deltas, text = _stream(tok, ids, rng, skip)
        assert text == tok.decode(ids, skip_special_tokens=skip)
        # every delta but the flush is valid text that never ends in the middle of a character
        for delta in deltas[:-1]:
            delta.encode("utf-8")


def test_incremental_holds_back_partial_characters(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        rng = random.Random(len(text))
        deltas, joined = _stream(tok, ids, rng, skip=False)
        assert joined == unicodedata.normalize("NFC", text)
        assert "\ufffd" not in joined
    # a 4-byte emoji split into byte tokens comes out whole, on the last byte
    emoji_ids = tok.encode("🤖")
    assert len(emoji_ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.feed([i]) for i in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["🤖"]
    assert detok.flush() == ""


def test_incremental_truncated_character_flushes_as_replacement(tok: Tokenizer) -> None:
    emoji_ids = tok.encode("🤖")
    detok = IncrementalDetokenizer(tok)
    assert detok.feed(emoji_ids[:-1]) == ""
    assert detok.flush() == "\ufffd"
    assert tok.decode(emoji_ids[:-1]) == "\ufffd"


def _write_tiny_tokenizer(path: Path) -> None:
    """A byte-level BPE with no merges (256 byte tokens) and two special tokens, written like a checkpoint's."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = HFTokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "added_tokens_decoder": {
        "258": {"content": "<think>", "special": False}}}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_eos_from_generation_config_and_errors(tmp_path: Path) -> None:
    _write_tiny_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 256}}))
    tiny = Tokenizer.from_dir(tmp_path)
    assert tiny.eos_token_ids == (257, 256) and tiny.pad_token_id == 256
    # an added token declared only in tokenizer_config.json is added with its id, as transformers does
    assert tiny.token_to_id("<think>") == 258
    assert tiny.encode("a<think>b") == [tiny.token_to_id("a"), 258, tiny.token_to_id("b")]
    assert tiny.decode(tiny.encode("é<|im_end|><think>")) == "é<think>"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 256, 3]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (257, 256, 3)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_fixture_checkpoint_tokenizer(shared_dir: Path) -> None:
    tok = Tokenizer.from_dir(shared_dir / "fixtures" / "austen-qwen35-tiny")
    assert tok.eos_token_ids == (248046,)
    assert tok.encode(REFERENCE_TEXT) == REFERENCE_IDS
