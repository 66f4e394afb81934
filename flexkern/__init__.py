"""flexkern: Mixture-of-Experts kernels for PyTorch and the FlexOlmo method on top."""
from . import ops
from .nn import FlexMoE
from .ops import Dispatch, dispatch, experts_swiglu, route
from ._backends import load_backends

__version__ = "0.1.0"
load_backends()

__all__ = ["FlexMoE", "Dispatch", "dispatch", "experts_swiglu", "route", "ops", "__version__"]
