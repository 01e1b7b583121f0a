"""The `fp4serve` console command: one argparse front end, one module per subcommand.

Each subcommand lives in `fp4serve/commands/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. Those modules import heavy dependencies (torch, the model) only inside `run`, so
`fp4serve --help` and `--version` stay fast. A `ValueError` raised by a command is a user error: it is printed
as one clear line and the exit code is 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fp4serve import __version__

SUBCOMMANDS: dict[str, str] = {
    "serve": "serve a model through the OpenAI-compatible HTTP API (default: the bundled demo model)",
    "quantize": "quantize a BF16 Qwen3.5 checkpoint to NVFP4 (ModelOpt HF format)",
    "eval": "compare a reference and a quantized model: perplexity, KL divergence, top-1 agreement",
    "chat": "interactive terminal chat with a model",
    "bench": "benchmark decode/prefill speed of the engine",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp4serve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fp4serve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"fp4serve.commands.{name}")
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"fp4serve.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except ValueError as exc:
        print(f"fp4serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fp4serve {args.command}: interrupted", file=sys.stderr)
        return 130
