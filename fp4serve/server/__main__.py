"""`python -m fp4serve.server [MODEL] [flags]` is the same as `fp4serve serve [MODEL] [flags]`."""

import sys

from fp4serve.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
