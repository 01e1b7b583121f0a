"""`fp4serve eval REF QUANT [QUANT ...] --data FILE...`: perplexity, KL(ref || quant) and top-1 agreement.

Every model is loaded with fp4serve's own loader (BF16 or NVFP4); the tokenizer comes from REF. Several quantized
checkpoints may be compared in one run: the reference is then computed once. The work is in
`fp4serve.quant.evaluate`; heavy imports happen inside `run` so `fp4serve --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", type=Path, help="reference checkpoint (usually the BF16 original)")
    parser.add_argument("quant", type=Path, nargs="+", help="quantized checkpoint(s) to compare with the reference")
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        metavar="FILE",
        help="evaluation text: files, directories or .jsonl (cut into windows like calibration data)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (default all)")
    parser.add_argument(
        "--linear-mode",
        choices=("w4a16", "w4a4"),
        default="w4a16",
        help="how NVFP4 Linears run: w4a16 (weights only, like Hopper) or w4a4 (activations quantized with the "
        "checkpoint's input_scale, emulating Blackwell)",
    )
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if present)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    parser.add_argument("--batch-windows", type=int, default=4, help="windows per forward batch (default 4)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from fp4serve.model.loader import load_model
    from fp4serve.quant.calib_data import token_windows
    from fp4serve.quant.evaluate import evaluate_models
    from fp4serve.quant.pipeline import resolve_device
    from fp4serve.tokenizer import Tokenizer

    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be at least 1, got {args.max_windows}")
    if args.batch_windows < 1:
        raise ValueError(f"--batch-windows must be at least 1, got {args.batch_windows}")
    for path in (args.ref, *args.quant):
        if not path.is_dir():
            raise ValueError(f"model directory {path} does not exist")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    windows = token_windows(Tokenizer.from_dir(args.ref), args.data, args.seq_len, args.max_windows)
    progress = not args.no_progress

    def load(path: Path):
        return load_model(path, device=device, dtype=dtype, linear_mode=args.linear_mode, progress=progress)

    reference = (str(args.ref), load(args.ref))
    candidates = [(str(path), load(path)) for path in args.quant]
    for name, model in (reference, *candidates):
        if model.config.vocab_size != reference[1].config.vocab_size:
            raise ValueError(f"{name} has vocab_size {model.config.vocab_size}, the reference has another")
    result = evaluate_models(
        reference,
        candidates,
        windows.tokens,
        device=device,
        dtype=dtype,
        windows_per_batch=args.batch_windows,
        progress=progress,
    )
    if args.json:
        print(json.dumps(result.to_dict() | {"linear_mode": args.linear_mode, "dtype": args.dtype}, indent=2))
    else:
        print(f"{args.linear_mode} ({args.dtype}); data: {windows.describe()}")
        print(result.table())
    return 0
