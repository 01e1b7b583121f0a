"""`python -m fp4serve` is the same as the `fp4serve` console command."""

from fp4serve.cli import main

raise SystemExit(main())
