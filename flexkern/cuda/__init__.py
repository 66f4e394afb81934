"""CUDA backend: the routing and dispatch kernels of the compiled extension flexkern._C.

Importing it registers the "cuda" implementations of the ``route`` and ``dispatch`` ops. It raises
ImportError when flexkern._C is not built, and the package then runs the other backends. Sizes the
kernels do not cover (float64, more than 256 experts or top-k above 16 for route, more than 1024
experts for dispatch) fall back to the reference inside these functions.
"""
from __future__ import annotations

try:
    from flexkern import _C  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "flexkern._C is not built; reinstall with nvcc available "
        "(FLEXKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation)"
    ) from exc

from flexkern.ops import backend as _backend

from .dispatch import dispatch_cuda, max_tiles, tile_schedule
from .route import route_cuda, route_topk

_backend.register("route", "cuda", route_cuda)
_backend.register("dispatch", "cuda", dispatch_cuda)

__all__ = ["dispatch_cuda", "max_tiles", "route_cuda", "route_topk", "tile_schedule"]
