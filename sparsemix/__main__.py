"""`python -m sparsemix`: the command line (see sparsemix/cli.py)."""

import sys

from .cli import main

sys.exit(main())
