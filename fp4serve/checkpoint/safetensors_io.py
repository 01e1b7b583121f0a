"""Read and write HF-style safetensors checkpoints: one `model.safetensors`, or shards + `model.safetensors.index.json`.

`CheckpointReader` parses every shard's header itself when it opens a directory (8-byte length + JSON, no tensor
data touched), so a missing, truncated or corrupt shard, or an index naming a file or tensor that is not there, is
reported up front as a ValueError naming the file, before any weight is loaded. Names, shapes and dtypes come from
the headers; tensors are read one at a time through safetensors' memory-mapped `safe_open`, so a loader can stream a
checkpoint shard by shard without holding it in memory.

`ShardedWriter` fills shards up to `max_shard_bytes` in the order tensors are added, stages each shard under a
temporary name, and only renames it into place when the checkpoint is closed (file names need the shard count); the
index is written last. Every file is replaced atomically (see `atomic.py`); files of an older checkpoint in the same
directory that the new one does not use are removed, so the directory never mixes two checkpoints' layouts.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp4serve.checkpoint.atomic import write_json_atomic

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
# a header larger than this is not a safetensors header (the format's own limit is 100 MB)
MAX_HEADER_BYTES = 100 * 1024**2
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, from the shard header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # start of its bytes inside the shard's data section


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header; ValueError naming the file if it is missing or damaged."""
    if not file.is_file():
        raise ValueError(f"checkpoint shard {file} does not exist")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"checkpoint shard {file} is truncated: {size} bytes, shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"checkpoint shard {file} is truncated or not a safetensors file: header of {header_len} bytes "
                f"in a {size}-byte file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint shard {file} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint shard {file} has a corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"checkpoint shard {file}: tensor {name} has an unreadable header entry {entry}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ValueError(
                f"checkpoint shard {file}: tensor {name} ({entry['dtype']} {list(shape)}) claims bytes "
                f"{begin}..{end}, which do not match its shape"
            )
        data_end = max(data_end, end)
        infos[name] = TensorInfo(file=file, dtype=dtype, shape=shape, offset=begin)
    if data_end > data_size:
        raise ValueError(
            f"checkpoint shard {file} is truncated: its header needs {8 + header_len + data_end} bytes, "
            f"the file has {size}"
        )
    if data_end < data_size:
        raise ValueError(f"checkpoint shard {file} is corrupt: {data_size - data_end} bytes after the last tensor")
    return infos


class CheckpointReader:
    """A checked view of a checkpoint directory's tensors (single file or index + shards)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_FILE
        if index.is_file():
            self._infos = self._read_index(index)
        elif (self.path / SINGLE_FILE).is_file():
            self._infos = read_header(self.path / SINGLE_FILE)
        else:
            raise ValueError(f"checkpoint directory {self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._handles: dict[Path, object] = {}

    def _read_index(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint index {index} is unreadable: {e!r}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"checkpoint index {index}: weight_map is not an object")
        headers: dict[str, dict[str, TensorInfo]] = {}
        infos: dict[str, TensorInfo] = {}
        for name, file_name in weight_map.items():
            if file_name not in headers:
                file = self.path / file_name
                if not file.is_file():
                    raise ValueError(f"checkpoint index {index} refers to shard {file_name}, which does not exist")
                headers[file_name] = read_header(file)
            info = headers[file_name].get(name)
            if info is None:
                raise ValueError(f"checkpoint index {index} puts tensor {name} in {file_name}, which does not hold it")
            infos[name] = info
        return infos

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor that owns its memory)."""
        file = self.info(name).file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def shards(self) -> list[tuple[Path, list[str]]]:
        """Files in name order, each with its tensors in on-disk order (sequential reads when loading)."""
        by_file: dict[Path, list[str]] = {}
        for name, info in self._infos.items():
            by_file.setdefault(info.file, []).append(name)
        return [
            (file, sorted(names, key=lambda n: self._infos[n].offset))
            for file, names in sorted(by_file.items(), key=lambda item: item[0].name)
        ]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedWriter:
    """Write tensors into size-capped shards; `close()` names them, writes the index and cleans stale files."""

    def __init__(
        self,
        path: str | Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._names: set[str] = set()
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._staged: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ValueError(f"checkpoint writer for {self.path} is already closed")
        if name in self._names:
            raise ValueError(f"tensor {name} was added twice to the checkpoint in {self.path}")
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses views and tensors sharing storage (tied weights): give each its own memory
        if t.untyped_storage().nbytes() != t.nbytes or any(
            t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in self._current.values()
        ):
            t = t.clone()
        if self._current and self._current_bytes + t.nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._current[name] = t
        self._current_bytes += t.nbytes
        self._total_bytes += t.nbytes

    def _flush(self) -> None:
        tmp = self.path / f".fp4serve-shard-{os.getpid()}-{len(self._staged):05d}.tmp"
        try:
            save_file(self._current, str(tmp), metadata=self.metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._staged.append((tmp, list(self._current)))
        self._current = {}
        self._current_bytes = 0

    def close(self) -> list[Path]:
        """Finish the checkpoint; return the written tensor files."""
        if self._closed:
            raise ValueError(f"checkpoint writer for {self.path} is already closed")
        if self._current or not self._staged:
            self._flush()
        self._closed = True
        count = len(self._staged)
        finals = (
            [self.path / SINGLE_FILE]
            if count == 1
            else [self.path / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for (tmp, _), final in zip(self._staged, finals, strict=True):
            os.replace(tmp, final)
        index = self.path / INDEX_FILE
        if count > 1:
            weight_map = {
                name: final.name for (_, names), final in zip(self._staged, finals, strict=True) for name in names
            }
            write_json_atomic(
                index,
                {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
            )
        else:
            index.unlink(missing_ok=True)
        self._remove_stale(set(finals))
        return finals

    def abort(self) -> None:
        """Drop everything staged so far; files already in the directory stay as they were."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()
        self._current.clear()
        self._closed = True

    def _remove_stale(self, keep: set[Path]) -> None:
        for file in self.path.iterdir():
            if file in keep:
                continue
            if file.name == SINGLE_FILE or _SHARD_NAME.fullmatch(file.name):
                file.unlink()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_checkpoint(
    path: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write (name, tensor) pairs as a checkpoint in `path`; return the tensor files written."""
    writer = ShardedWriter(path, max_shard_bytes=max_shard_bytes, metadata=metadata)
    try:
        for name, tensor in tensors:
            writer.add(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
