"""`fp4serve bench`: not built yet; its issue fills this module in."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    raise ValueError("'fp4serve bench' is not available in this version yet")
