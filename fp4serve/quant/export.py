"""Write a quantized checkpoint atomically: staged in a hidden sibling directory, renamed into place at the end.

`OutputStage` owns the staging directory. It refuses an existing non-empty output unless overwriting is allowed,
proves the parent is writable by creating the stage before any work starts, and on `commit()` swaps the finished
stage in (an overwritten checkpoint is moved aside first and deleted only after the new one is in place). Any
failure or interrupt before the commit deletes the stage, so the output path never holds a half-written checkpoint.

The metadata files follow ModelOpt's export: `hf_quant_config.json` and config.json's `quantization_config` come
from `QuantConfig` (key for key ModelOpt 0.47's), plus `"nvfp4_embed": true` when the token embedding is NVFP4 (the
flag vLLM reads to build an NVFP4 embedding). Tokenizer, chat template, generation and preprocessor configs are
copied unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fp4serve.checkpoint.atomic import write_json_atomic
from fp4serve.checkpoint.quant_config import CONFIG, HF_QUANT_CONFIG, QuantConfig

COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


class OutputStage:
    """A staging directory next to `output` that becomes `output` on `commit()`."""

    def __init__(self, output: str | Path, *, overwrite: bool) -> None:
        self.output = Path(output).absolute()
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"output path {self.output} exists and is not a directory")
        if self.output.is_dir() and any(self.output.iterdir()) and not overwrite:
            raise ValueError(f"output directory {self.output} exists and is not empty (pass --overwrite to replace it)")
        parent = self.output.parent
        if not parent.is_dir():
            raise ValueError(f"cannot write {self.output}: parent directory {parent} does not exist")
        self.path = parent / f".{self.output.name}.fp4serve-tmp-{os.getpid()}"
        try:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir()
        except OSError as e:
            raise ValueError(f"cannot write output directory {self.output}: {e.strerror or e}") from None
        self._done = False

    def commit(self) -> Path:
        """Move the finished stage to the output path (replacing an old checkpoint there)."""
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.fp4serve-old-{os.getpid()}"
            os.replace(self.output, old)
        os.replace(self.path, self.output)
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def discard(self) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer/template/generation/preprocessor files that exist in `source`; return their names."""
    copied = []
    for name in COPIED_FILES:
        file = source / name
        if file.is_file():
            shutil.copyfile(file, dest / name)
            copied.append(name)
    return copied


def write_quant_metadata(source: Path, dest: Path, quant: QuantConfig, *, nvfp4_embed: bool) -> None:
    """Write dest/config.json (source config + quantization_config) and dest/hf_quant_config.json."""
    hf = quant.to_hf_quant_config()
    block = quant.to_config_quantization_block()
    if nvfp4_embed:
        hf["quantization"]["nvfp4_embed"] = True
        block["nvfp4_embed"] = True
    config = json.loads((source / CONFIG).read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["quantization_config"] = block
    write_json_atomic(dest / HF_QUANT_CONFIG, hf, indent=4)
    write_json_atomic(dest / CONFIG, config, indent=2)
