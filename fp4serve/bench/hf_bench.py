"""The transformers baseline: `Qwen3_5ForCausalLM` from the same geometry, random BF16 weights, timed like ours.

This is the reference point users compare against ("what does plain transformers do on this card"), so it uses
transformers the way its users do: the model built from a `Qwen3_5TextConfig` (its own random init, directly on
the device), the model's own cache, one `forward` per step with greedy argmax, `logits_to_keep=1` so that only the
last position's logits are computed. Whatever kernels transformers finds (flash-linear-attention, causal-conv1d)
it uses; the JSON records whether fla was importable. transformers is imported only here and only when the
baseline runs: fp4serve itself never needs it.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch

from fp4serve.bench.engine_bench import DecodeResult, PrefillResult


def transformers_version() -> str | None:
    """The installed transformers version if it has Qwen3.5, else None."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    try:
        from transformers import Qwen3_5ForCausalLM  # noqa: F401
    except ImportError:
        return None
    return str(transformers.__version__)


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def build_hf_model(config: dict[str, Any], *, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    hf_config = Qwen3_5TextConfig(**{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(seed)
    # created (and randomly initialised by transformers) directly on the device
    with torch.device(device):
        model = Qwen3_5ForCausalLM._from_config(hf_config, dtype=dtype)
    if next(model.parameters()).device.type != device.type:
        model = model.to(device)
    return model.eval()


class HFBench:
    def __init__(self, model: torch.nn.Module, *, device: torch.device, vocab_size: int, seed: int = 0) -> None:
        self.model = model
        self.device = device
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prompts(self, batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch, length), generator=self.gen).to(self.device)

    def _forward(self, ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(dim=-1, keepdim=True), out.past_key_values

    @torch.inference_mode()
    def decode(self, *, batch: int, context_len: int, warmup: int, steps: int) -> DecodeResult:
        self._sync()
        t0 = time.perf_counter()
        token, cache = self._forward(self._prompts(batch, context_len))
        self._sync()
        fill_s = time.perf_counter() - t0
        times = []
        for i in range(warmup + steps):
            self._sync()
            t = time.perf_counter()
            token, cache = self._forward(token, cache)
            self._sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        mean_context = context_len + warmup + (steps - 1) / 2
        del cache
        return DecodeResult(batch, context_len, mean_context, warmup, times, fill_s)

    @torch.inference_mode()
    def prefill(self, *, num_prompts: int, prompt_len: int, warmup: int, runs: int) -> PrefillResult:
        times = []
        for i in range(warmup + runs):
            ids = self._prompts(num_prompts, prompt_len)
            self._sync()
            t = time.perf_counter()
            token, _ = self._forward(ids)
            token.tolist()
            self._sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return PrefillResult(num_prompts, prompt_len, times)

    def ttft(self, *, prompt_len: int, warmup: int, runs: int) -> list[float]:
        return self.prefill(num_prompts=1, prompt_len=prompt_len, warmup=warmup, runs=runs).run_s
