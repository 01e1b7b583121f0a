"""Tokenizer and streaming detokenizer for a checkpoint directory.

Encoding and full decoding go through the `tokenizers` library on `tokenizer.json`, so the ids are exactly those of
the Hugging Face fast tokenizer. Streaming decoding works on bytes instead of strings: Qwen's byte-level BPE maps
every token to a byte string, and a UTF-8 incremental decoder over the concatenated bytes emits a character only
once all of its bytes have arrived. That is exact (no "decode twice and diff" heuristics) and the joined deltas
equal the full decode, including the U+FFFD that a truncated character turns into at the end.

Special tokens (added tokens with `special: true`, e.g. `<|im_end|>`) are dropped with `skip_special_tokens`;
added tokens with `special: false` (`<think>`, `<tool_call>`) are ordinary text. The eos ids are the tokenizer's
eos token followed by `generation_config.json`'s `eos_token_id` (or `config.json`'s when there is no
generation config), as vLLM stops on all of them.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders
from tokenizers import Tokenizer as _HFTokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte map of byte-level BPE (the GPT-2 scheme: printable bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[str, int] = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as an AddedToken dict
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, `decode`, eos ids and per-token bytes for streaming."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        eos_token_ids: Sequence[int] = (),
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise ValueError(
                f"tokenizer decoder {type(backend.decoder).__name__} is not supported: fp4serve needs a byte-level "
                "BPE tokenizer (ByteLevel decoder) such as Qwen's"
            )
        self._backend = backend
        self._alphabet = _byte_level_alphabet()
        added = backend.get_added_tokens_decoder()
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` plus special tokens and eos ids from the other config files of `path`."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"no tokenizer.json in {path}: fp4serve needs a fast (tokenizers) tokenizer file")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ValueError(f"cannot load {tokenizer_file}: {exc}") from exc
        tok_config = _read_json(path / "tokenizer_config.json")
        _add_missing_tokens(backend, tok_config.get("added_tokens_decoder") or {}, tokenizer_file)

        special = {k: c for k in _SPECIAL_TOKEN_KEYS if (c := _token_content(tok_config.get(k))) is not None}
        eos_ids: list[int] = []
        if "eos_token" in special:
            eos_id = backend.token_to_id(special["eos_token"])
            if eos_id is None:
                raise ValueError(f"eos_token {special['eos_token']!r} of {path}/tokenizer_config.json is not a token")
            eos_ids.append(eos_id)
        generation_config = _read_json(path / "generation_config.json")
        if generation_config:
            eos_ids += _as_id_list(generation_config.get("eos_token_id"))
        else:
            config = _read_json(path / "config.json")
            text_config = config.get("text_config") or {}
            eos_ids += _as_id_list(config.get("eos_token_id", text_config.get("eos_token_id")))
        return cls(backend, eos_token_ids=eos_ids, special_tokens=special)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (the model may pad its vocab beyond)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos id (first of `eos_token_ids`)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens.get("pad_token")
        return None if pad is None else self._backend.token_to_id(pad)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of a token (byte-level form, e.g. 'Ġhello'), None for an unknown id."""
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; empty for ids the tokenizer does not know (padded vocab rows)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added:
            data = self._added[token_id].encode("utf-8")
        else:
            piece = self._backend.id_to_token(token_id) if token_id >= 0 else None
            if piece is None:
                data = b""
            else:
                # characters outside the byte alphabet cannot occur in byte-level vocab entries; keep them as utf-8
                data = b"".join(
                    bytes([self._alphabet[ch]]) if ch in self._alphabet else ch.encode("utf-8") for ch in piece
                )
        self._bytes_cache[token_id] = data
        return data


def _add_missing_tokens(backend: _HFTokenizer, added_tokens_decoder: dict[str, Any], source: Path) -> None:
    # tokenizer_config.json may declare added tokens that tokenizer.json lacks; HF adds them, so do we
    known = backend.get_added_tokens_decoder()
    for key in sorted(added_tokens_decoder, key=int):
        token_id, spec = int(key), added_tokens_decoder[key]
        if token_id in known:
            continue
        content = spec["content"]
        token = AddedToken(
            content,
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", not spec.get("special", False)),
            special=spec.get("special", False),
        )
        if spec.get("special", False):
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != token_id:
            raise ValueError(
                f"added token {content!r} has id {token_id} in tokenizer_config.json but "
                f"{backend.token_to_id(content)} after loading {source}"
            )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting part of a multi-byte character.

    `feed(ids)` returns the text that became complete; `flush()` ends the stream (an incomplete trailing character
    becomes U+FFFD, as in the full decode). `"".join(deltas) + flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.num_tokens = 0

    def feed(self, ids: Iterable[int]) -> str:
        data = b"".join(self._tokenizer.token_bytes(i) for i in self._count(ids) if i not in self._skip)
        delta = self._utf8.decode(data, final=False) if data else ""
        if delta:
            self._parts.append(delta)
        return delta

    def flush(self) -> str:
        delta = self._utf8.decode(b"", final=True)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _count(self, ids: Iterable[int]) -> Iterable[int]:
        for i in ids:
            self.num_tokens += 1
            yield int(i)
