"""``python -m flexkern``: the same command line as the ``flexkern`` script (flexkern.cli)."""
import sys

from .cli import main

sys.exit(main())
