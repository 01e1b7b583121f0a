"""Tiny multimodal Qwen3.5 checkpoints for the end-to-end tests (a uniquely named module, importable from tests).

`build_checkpoints` makes a random transformers `Qwen3_5ForConditionalGeneration` (tiny text and vision configs, the
real Qwen3.5 vocabulary so the real tokenizer and chat template work) and writes it twice:
- `fp32/`: the float32 checkpoint, the model transformers is compared against;
- `nvfp4/`: its BF16 copy quantized by our own `fp4serve quantize` (default recipe, a few Austen windows): NVFP4
  text Linears, the vision tower left BF16.
Both carry the tokenizer, the chat template, generation_config.json and small pixel budgets in the preprocessor
configs, so test images stay a handful of tokens.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from fp4serve.cli import main as cli_main

VOCAB = 248320
IM_END = 248046
TEXT_CONFIG = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, vocab_size=VOCAB, tie_word_embeddings=True,
    max_position_embeddings=4096, eos_token_id=IM_END,
    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[2, 1, 1],
                         mrope_interleaved=True),
)  # fmt: skip
VISION_CONFIG = dict(
    depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=64, num_position_embeddings=64,
    patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
)  # fmt: skip
# images: 32x32 .. 256x256 pixels (1 .. 64 tokens); videos: at most 16 tokens per frame
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 32 * 32, 256 * 256
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 32 * 32, 128 * 128 * 8


@dataclass
class Checkpoints:
    fp32: Path
    nvfp4: Path
    hf_model: Any  # the float32 transformers model written to `fp32`


def _side_files(shared: Path, dest: Path) -> None:
    assets = shared / "assets"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / "qwen3_5_tokenizer" / name, dest / name)
    shutil.copy(assets / "qwen3_5_chat_template.jinja", dest / "chat_template.jinja")
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
              "image_std": [0.5] * 3}  # fmt: skip
    image = common | {"size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}}
    video = common | {"size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}, "fps": 2.0}
    (dest / "preprocessor_config.json").write_text(json.dumps(image))
    (dest / "video_preprocessor_config.json").write_text(json.dumps(video))
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END], "temperature": 1.0}))


def build_hf_model() -> Any:
    """The tiny float32 `Qwen3_5ForConditionalGeneration`, with every vision parameter randomised."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = Qwen3_5Config(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, tie_word_embeddings=True)
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        # default init leaves norms/biases at 0/1, which hides layout bugs
        for p in model.model.visual.parameters():
            p.normal_(0.0, 0.2)
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    return model


def _quantize(source: Path, dest: Path, calib: Path) -> None:
    """`fp4serve quantize` (the default recipe: NVFP4 text, `model.visual*` kept BF16) on a few short windows."""
    argv = ["quantize", str(source), "--output", str(dest), "--calib-data", str(calib), "--calib-samples", "4",
            "--calib-seq-len", "32", "--device", "cpu", "--no-progress"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(argv) == 0


def build_checkpoints(root: Path, shared: Path) -> Checkpoints:
    model = build_hf_model()
    fp32 = root / "fp32"
    model.save_pretrained(fp32)
    _side_files(shared, fp32)
    # the quantizer's input is what a real one is: a BF16 checkpoint
    bf16 = root / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16)
    _side_files(shared, bf16)
    nvfp4 = root / "nvfp4"
    _quantize(bf16, nvfp4, shared / "corpus" / "austen" / "persuasion.txt")
    return Checkpoints(fp32, nvfp4, model)


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(image: PIL.Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class LiveServer:
    url: str
    state: Any
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_server(state: Any) -> LiveServer:
    """The real app on a free port, served by uvicorn in a thread."""
    import uvicorn

    from fp4serve.server.api import build_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", state, server, thread)
