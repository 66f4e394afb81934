"""CUDA backend: the routing and dispatch kernels of the compiled extension flexkern._C.

Importing it registers the "cuda" implementations of the ``route`` and ``dispatch`` ops. It raises
ImportError when flexkern._C is not built, and the package then runs the other backends. What the
kernels cover is declared to the seam (``supports_route``: not float64, at most 256 experts and
top-k 16; ``supports_dispatch``: at most 1024 experts); flexkern.ops.backend sends the rest on.
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

from .dispatch import dispatch_cuda, supports_dispatch
from .route import route_cuda, route_topk, supports_route

_backend.register("route", "cuda", route_cuda, supports=supports_route)
_backend.register("dispatch", "cuda", dispatch_cuda, supports=supports_dispatch)

__all__ = ["dispatch_cuda", "route_cuda", "route_topk", "supports_dispatch", "supports_route"]
