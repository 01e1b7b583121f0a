"""`fp4serve quantize MODEL --output DIR`: calibrated NVFP4 post-training quantization in ModelOpt's format.

The argument parsing lives here; the work is `fp4serve.quant.pipeline.quantize_checkpoint`, imported inside `run`
so that `fp4serve --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fp4serve.quant.algorithms import ALGORITHMS
from fp4serve.quant.recipe import RECIPES

DTYPES = ("auto", "float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="BF16 Qwen3.5 checkpoint directory (either layout)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="directory to write the NVFP4 checkpoint to")
    parser.add_argument(
        "--calib-data",
        nargs="+",
        type=Path,
        required=True,
        metavar="PATH",
        help="calibration text: files, directories (their files sorted by name) or .jsonl with a 'text' field; "
        "read in order, concatenated, tokenized once",
    )
    parser.add_argument("--calib-samples", type=int, default=256, help="number of calibration windows (default 256)")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="default",
        help="default: nvidia-modelopt 0.47's NVFP4_DEFAULT_CFG (in_proj_a/in_proj_b stay BF16); seed: the seed "
        "model card's policy (in_proj_a/in_proj_b NVFP4 too). lm_head, conv1d, norms and model.visual* stay BF16",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep modules matching this fnmatch pattern (checkpoint module names, e.g. '*.mlp.down_proj') in BF16; "
        "repeatable",
    )
    parser.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="max",
        help="max: ModelOpt's default (byte-identical weights); mse: per-block FP8 scale search weighted by the "
        "input statistics; gptq: GPTQ error feedback with the block scale search (best quality, slower)",
    )
    parser.add_argument(
        "--quantize-embedding",
        action="store_true",
        help='also quantize the token embedding (tied lm_head) to NVFP4; the config gets "nvfp4_embed": true, '
        "which vLLM needs to load it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    parser.add_argument("--device", default="auto", help="torch device for calibration (default: cuda if present)")
    parser.add_argument(
        "--calib-dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the calibration forward (auto: float32 on CPU, bfloat16 on GPU)",
    )
    parser.add_argument(
        "--calib-batch-tokens", type=int, default=8192, help="tokens per calibration forward batch (default 8192)"
    )
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ Hessian damping, fraction of mean diag")
    parser.add_argument("--max-shard-size", type=float, default=4.0, help="output shard size limit in GB (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from fp4serve.quant.algorithms import AlgorithmConfig
    from fp4serve.quant.pipeline import QuantizeOptions, quantize_checkpoint
    from fp4serve.quant.recipe import QuantRecipe

    if args.calib_seq_len < 2:
        raise ValueError(f"--calib-seq-len must be at least 2, got {args.calib_seq_len}")
    if args.max_shard_size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {args.max_shard_size}")
    options = QuantizeOptions(
        model=args.model,
        output=args.output,
        calib_data=tuple(args.calib_data),
        recipe=QuantRecipe(args.recipe, quantize_embedding=args.quantize_embedding, exclude=tuple(args.exclude)),
        algorithm=AlgorithmConfig(args.algorithm, damp=args.damp),
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        overwrite=args.overwrite,
        device=args.device,
        calib_dtype=None if args.calib_dtype == "auto" else getattr(torch, args.calib_dtype),
        batch_tokens=args.calib_batch_tokens,
        max_shard_bytes=int(args.max_shard_size * 1e9),
        progress=not args.no_progress,
    )
    summary = quantize_checkpoint(options)
    print(summary.table())
    return 0
