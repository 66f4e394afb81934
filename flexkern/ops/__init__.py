"""The MoE ops: route -> dispatch -> experts_swiglu. Each is a torch.library custom op with a
plain-PyTorch reference (the CPU path and the test oracle) and optional fast backends."""
from . import backend
from .dispatch import Dispatch, dispatch, dispatch_ref
from .experts import experts_bwd_ref, experts_fwd_ref, experts_swiglu
from .route import route, route_ref
from .split import experts_swiglu_grouped, offsets_from_counts, permute, unpermute

__all__ = ["backend", "Dispatch", "dispatch", "dispatch_ref", "experts_swiglu", "experts_fwd_ref",
           "experts_bwd_ref", "route", "route_ref", "permute", "experts_swiglu_grouped",
           "offsets_from_counts", "unpermute"]

# Importing the ops registers the optional fast backends (triton, cuda) that can load here.
from .._backends import load_backends as _load_backends  # noqa: E402

_load_backends()
