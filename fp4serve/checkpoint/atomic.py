"""Atomic file writes: write to a hidden temporary file in the target directory, fsync, then rename over the target.

A reader (or a crash) therefore sees either the old file or the complete new one, never a half-written file. The
temporary name lives in the same directory so the final `os.replace` is a rename on one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    """A hidden sibling of `path` unique to this process, used as the staging file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`, on error delete it."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # some writers (safetensors) create private 0600 files; a checkpoint is meant to be shared like any output
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)` and atomically move the result to `path`."""
    with staged(path) as tmp:
        write(tmp)


def write_json_atomic(path: str | Path, obj: object, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Serialize `obj` first (so a serialization error leaves `path` untouched), then write it atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
