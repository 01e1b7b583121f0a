"""Calibration/evaluation windows: file order, directories, .jsonl, the exact window rule, and input errors.

A byte tokenizer without merges makes every character one token, so the expected windows can be written down."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import write_byte_tokenizer

from fp4serve.quant.calib_data import read_corpus, token_windows
from fp4serve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(path)
    return Tokenizer.from_dir(path)


def decode_windows(tok: Tokenizer, windows) -> list[str]:
    return [tok.decode(row.tolist()) for row in windows.tokens]


def test_order_directories_and_jsonl(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.txt").write_text("BBB\n")
    (d / "a.txt").write_text("AAA")
    (d / ".hidden").write_text("never")
    (tmp_path / "z.txt").write_text("ZZ")
    (tmp_path / "r.jsonl").write_text('{"text": "r1"}\n\n{"text": "r2\\n"}\n')
    # given order wins over names; a directory contributes its files sorted by name; pieces never run together
    assert read_corpus([tmp_path / "z.txt", d, tmp_path / "r.jsonl"]) == "ZZ\nAAA\nBBB\nr1\nr2\n"


def test_first_consecutive_windows(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("abcdefghijklmnopqrstuvwxyz")
    w = token_windows(tok, [tmp_path / "t.txt"], seq_len=5, num_windows=3)
    assert decode_windows(tok, w) == ["abcde", "fghij", "klmno"]
    assert w.total_tokens == 26 and not w.short
    everything = token_windows(tok, [tmp_path / "t.txt"], seq_len=5)
    assert everything.num_windows == 5 and everything.requested is None


def test_too_little_text_uses_what_there_is(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("abcdefghijk")
    w = token_windows(tok, [tmp_path / "t.txt"], seq_len=4, num_windows=10)
    assert decode_windows(tok, w) == ["abcd", "efgh"]
    assert w.short and "only 2 of the 10 requested windows" in w.describe()


def test_input_errors(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        token_windows(tok, [tmp_path / "missing.txt"], 4, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        token_windows(tok, [tmp_path / "empty"], 4, 1)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="contains no text"):
        token_windows(tok, [tmp_path / "blank.txt"], 4, 1)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'text' field"):
        token_windows(tok, [tmp_path / "bad.jsonl"], 4, 1)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, [tmp_path / "short.txt"], 4, 1)
    with pytest.raises(ValueError, match="at least 1"):
        token_windows(tok, [tmp_path / "short.txt"], 2, 0)
