"""`python -m tileprefill`: see tileprefill.cli."""

import sys

from tileprefill.cli import main

sys.exit(main(prog="python -m tileprefill"))
