"""What a benchmark run measures: the settings (one frozen dataclass, filled from the command line), the names of
the models and phases, and the definitions of the numbers, which are written into the JSON beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp4serve.bench.engine_bench import Workload

MODELS = ("nvfp4", "bf16", "transformers")
PHASES = ("ttft", "prefill", "decode")

# what each number means, recorded in the JSON next to the numbers
DEFINITIONS = {
    "decode": "median wall time of one Engine.step() (device synchronised around it) that decodes one token for each "
    "of `batch` running requests whose prompts had `context_len` tokens; tok_s = batch / median step time",
    "prefill": "wall time from the first step to the first token of the last of `num_prompts` prompts of "
    "`prompt_len` tokens queued together (max_tokens=1); tok_s = prompt tokens / median time",
    "ttft": "wall time from Engine.add_request of one `prompt_len`-token prompt on an idle engine to the step that "
    "returns its first token (no tokenizer, no HTTP)",
    "floor": "max(bytes / measured copy bandwidth, FLOPs / measured matmul rate); decode bytes = every weight once "
    "(embedding rows only) + DeltaNet state read and written + K/V read; fraction_of_floor = floor / measured time",
    "weight_bytes": "bytes of all parameters and buffers of the model on the device",
}


@dataclass(frozen=True)
class BenchSettings:
    geometry: str = "27b"
    num_layers: int | None = None
    vocab_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    models: tuple[str, ...] = MODELS
    phases: tuple[str, ...] = PHASES
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    hf_batch_sizes: tuple[int, ...] = (1, 8)
    context_len: int = 1024
    warmup_steps: int = 3
    decode_steps: int = 20
    prefill_prompts: int = 8
    prefill_len: int = 2048
    ttft_len: int = 2048
    warmup_runs: int = 1
    runs: int = 3
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enforce_eager: bool = False
    linear_mode: str = "w4a16"
    seed: int = 0
    copy_bytes: int | None = None  # None: 2 GiB on a GPU, 32 MiB on CPU
    matmul_size: int | None = None  # None: 8192 on a GPU, 512 on CPU
    memory_margin_bytes: int | None = None  # None: estimated from the geometry
    time_budget_s: float | None = None

    def validate(self) -> None:
        for name in ("context_len", "decode_steps", "prefill_prompts", "prefill_len", "ttft_len", "runs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_runs < 0:
            raise ValueError("warmup counts must not be negative")
        if any(b <= 0 for b in (*self.batch_sizes, *self.hf_batch_sizes)):
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes} / {self.hf_batch_sizes}")
        for name, given, known in (("models", self.models, MODELS), ("phases", self.phases, PHASES)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; known: {list(known)}")

    def workload(self, batch_sizes: tuple[int, ...]) -> Workload:
        return Workload(
            batch_sizes=batch_sizes if "decode" in self.phases else (),
            context_len=self.context_len,
            warmup_steps=self.warmup_steps,
            decode_steps=self.decode_steps,
            prefill_prompts=self.prefill_prompts if "prefill" in self.phases else 1,
            prefill_len=self.prefill_len if "prefill" in self.phases else 1,
            ttft_len=self.ttft_len if "ttft" in self.phases else 1,
            max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size,
        )
