"""Subcommands of the `fp4serve` console command, one module each (see `fp4serve.cli`)."""
