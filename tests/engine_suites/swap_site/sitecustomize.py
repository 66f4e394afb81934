# Spawned worker processes of a flexkern-swapped pytest run (see ../flexkern_swap_plugin.py): apply the same
# swap. Active only when the parent set FLEXKERN_SWAP_ENGINES.
import os

if os.environ.get("FLEXKERN_SWAP_ENGINES"):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import flexkern_swap
    flexkern_swap.apply(tuple(os.environ["FLEXKERN_SWAP_ENGINES"].split(",")))
