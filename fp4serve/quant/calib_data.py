"""Text corpora for calibration and evaluation, cut into token windows by one exact rule.

Paths are read in the order given; a directory contributes its regular files sorted by name; a `.jsonl` file
contributes the `text` field of each line. The pieces are concatenated (a newline is inserted only where a piece does
not already end with one, so two records never run together), the whole text is tokenized once without special
tokens, and the windows are the first N consecutive non-overlapping runs of L tokens. Tokenizing once, rather than
per file, makes the windows independent of how the corpus happens to be split into files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fp4serve.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenWindows:
    """Token windows [num_windows, seq_len] and how they relate to what was asked for."""

    tokens: torch.Tensor  # [W, L] int64
    total_tokens: int  # tokens in the whole tokenized text
    requested: int | None  # windows asked for (None: as many as fit)

    @property
    def num_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def short(self) -> bool:
        """Fewer windows than requested (the text ran out)."""
        return self.requested is not None and self.num_windows < self.requested

    def describe(self) -> str:
        text = f"{self.num_windows} windows x {self.seq_len} tokens (text has {self.total_tokens} tokens)"
        if self.short:
            text += f"; only {self.num_windows} of the {self.requested} requested windows fit, using what there is"
        return text


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            children = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not children:
                raise ValueError(f"data directory {path} contains no files")
            files.extend(children)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path {path} does not exist")
    return files


def _read_pieces(file: Path) -> list[str]:
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read data file {file} as UTF-8 text: {e}") from None
    if file.suffix != ".jsonl":
        return [raw]
    pieces: list[str] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{file}:{number}: each .jsonl line must be an object with a string 'text' field")
        pieces.append(record["text"])
    return pieces


def read_corpus(paths: Sequence[str | Path]) -> str:
    """All text of `paths`, in order, as one string (ValueError for missing, unreadable or empty data)."""
    if not paths:
        raise ValueError("no data files given")
    files = _expand(paths)
    parts: list[str] = []
    for file in files:
        for piece in _read_pieces(file):
            if parts and not parts[-1].endswith("\n"):
                parts.append("\n")
            parts.append(piece)
    text = "".join(parts)
    if not text.strip():
        raise ValueError(f"the data ({', '.join(str(f) for f in files)}) contains no text")
    return text


def token_windows(
    tokenizer: Tokenizer, paths: Sequence[str | Path], seq_len: int, num_windows: int | None = None
) -> TokenWindows:
    """The first `num_windows` (None: all) non-overlapping `seq_len`-token windows of the corpus in `paths`."""
    if seq_len < 2:
        raise ValueError(f"sequence length must be at least 2 tokens, got {seq_len}")
    if num_windows is not None and num_windows < 1:
        raise ValueError(f"number of windows must be at least 1, got {num_windows}")
    ids = tokenizer.encode(read_corpus(paths), add_special_tokens=False)
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(f"the data has {len(ids)} tokens, fewer than one window of {seq_len} tokens")
    count = available if num_windows is None else min(num_windows, available)
    tokens = torch.tensor(ids[: count * seq_len], dtype=torch.int64).view(count, seq_len)
    return TokenWindows(tokens=tokens, total_tokens=len(ids), requested=num_windows)
