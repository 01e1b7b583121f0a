"""`fp4serve bench`: decode, prefill and time-to-first-token of the engine on a random-weight model.

Builds the chosen geometry (default: the real Qwen3.5-27B text model) with random NVFP4 weights directly on the
device, runs it through the real engine, and compares with a BF16 engine baseline and transformers where they fit.
Every result is set against a floor computed from the device's measured copy bandwidth and matmul rate. Writes a
JSON record and a PNG chart (default under bench/results/, named after the card and the time) and prints a table
last. Phases and models are selectable, and `--time-budget` skips what would start after the budget is spent, so a
run fits a fixed time slot. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fp4serve.config import parse_memory_size


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--geometry", default="27b", help="27b (default), 27b-4l (27B widths, 4 layers) or tiny")
    model.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    model.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    model.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when present)")
    model.add_argument("--dtype", default="auto", help="activation dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16")
    model.add_argument("--linear-mode", default="w4a16", choices=("w4a16", "w4a4"), help="NVFP4 linear path")
    model.add_argument(
        "--models",
        type=_names,
        default=("nvfp4", "bf16", "transformers"),
        help="comma list of nvfp4, bf16 (our engine unquantized), transformers (default: all three)",
    )
    model.add_argument("--seed", type=int, default=0)

    what = parser.add_argument_group("measurements")
    what.add_argument(
        "--phases", type=_names, default=("ttft", "prefill", "decode"), help="comma list of ttft, prefill, decode"
    )
    what.add_argument(
        "--batch-sizes", type=_ints, default=(1, 8, 32, 128), help="decode batch sizes (default 1,8,32,128)"
    )
    what.add_argument(
        "--hf-batch-sizes", type=_ints, default=(1, 8), help="transformers decode batch sizes (default 1,8)"
    )
    what.add_argument("--context-len", type=int, default=1024, help="prompt tokens before decoding (default 1024)")
    what.add_argument("--decode-steps", type=int, default=20, help="timed decode steps per batch size (default 20)")
    what.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first (default 3)")
    what.add_argument("--prefill-prompts", type=int, default=8, help="prompts in the prefill run (default 8)")
    what.add_argument("--prefill-len", type=int, default=2048, help="tokens per prefill prompt (default 2048)")
    what.add_argument("--ttft-len", type=int, default=2048, help="prompt tokens of the TTFT run (default 2048)")
    what.add_argument("--runs", type=int, default=3, help="timed prefill / TTFT runs, median reported (default 3)")
    what.add_argument("--warmup-runs", type=int, default=1, help="untimed prefill / TTFT runs first (default 1)")
    what.add_argument("--time-budget", type=float, default=None, help="seconds; phases not started by then are skipped")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per engine step (8192)")
    engine.add_argument("--block-size", type=int, default=16, help="KV block size (16)")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the engine's flag)")
    engine.add_argument("--copy-bytes", default=None, help="buffer of the bandwidth test (default 2GiB GPU, 32MiB CPU)")
    engine.add_argument("--matmul-size", type=int, default=None, help="square matmul size (default 8192 GPU, 512 CPU)")
    engine.add_argument("--memory-margin", default=None, help="activation headroom kept free (default: estimated)")

    out = parser.add_argument_group("output")
    out.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file, or an existing directory to get the default name in it "
        "(default: bench/results/<card>-<geometry>-<time>.json)",
    )
    out.add_argument("--chart", type=Path, default=None, help="PNG path (default: the JSON path with .png)")
    out.add_argument("--chart-backend", default="auto", choices=("auto", "matplotlib", "pillow"))


def run(args: argparse.Namespace) -> int:
    from fp4serve.bench import report
    from fp4serve.bench.settings import BenchSettings
    from fp4serve.bench.suite import Suite

    settings = BenchSettings(
        geometry=args.geometry,
        num_layers=args.layers,
        vocab_size=args.vocab_size,
        device=args.device,
        dtype=args.dtype,
        models=args.models,
        phases=args.phases,
        batch_sizes=args.batch_sizes,
        hf_batch_sizes=args.hf_batch_sizes,
        context_len=args.context_len,
        warmup_steps=args.warmup_steps,
        decode_steps=args.decode_steps,
        prefill_prompts=args.prefill_prompts,
        prefill_len=args.prefill_len,
        ttft_len=args.ttft_len,
        warmup_runs=args.warmup_runs,
        runs=args.runs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        enforce_eager=args.enforce_eager,
        linear_mode=args.linear_mode,
        seed=args.seed,
        copy_bytes=None if args.copy_bytes is None else parse_memory_size(args.copy_bytes, name="--copy-bytes"),
        matmul_size=args.matmul_size,
        memory_margin_bytes=None
        if args.memory_margin is None
        else parse_memory_size(args.memory_margin, name="--memory-margin"),
        time_budget_s=args.time_budget,
    )
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    paths: dict[str, Path] = {}

    def on_update(results: dict) -> None:
        if "json" not in paths:
            if args.output is None or args.output.is_dir():
                paths["json"] = report.default_output_path(results, args.output or Path("bench/results"))
            else:
                paths["json"] = args.output
        report.write_json(paths["json"], results)

    results = Suite(settings, log=log, on_update=on_update).run()
    on_update(results)
    chart = args.chart or paths["json"].with_suffix(".png")
    backend = report.write_chart(chart, results, args.chart_backend)
    log(f"wrote {paths['json']} and {chart} ({backend})")
    print(report.format_table(results), flush=True)
    return 0
