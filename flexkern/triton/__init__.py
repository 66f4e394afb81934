"""Triton backend: grouped SwiGLU expert kernels (forward and backward) for experts_swiglu.

Importing this package registers ``experts_swiglu`` and ``experts_swiglu_backward`` under the
"triton" backend. It raises ImportError when triton is not importable, which leaves the reference
backend in place. Map: schedule.py (on-device tile -> expert), grouped_gemm.py (forward GEMMs, dx),
grouped_backward.py (recompute + fused SwiGLU backward, per-expert dW), combine.py (gather-sums
over K), lang.py (builtin-only helpers, so the interpreter works whatever the import order),
configs.py (launch tables), ops.py (buffers, launches, registration targets), compile_check.py
(offline compile of every table entry for a CUDA architecture: ``python -m flexkern.triton.compile_check``).
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a triton build that fails to initialise
    raise ImportError(f"flexkern.triton needs an importable triton: {exc}") from exc

from ..ops import backend as _backend
from .ops import experts_bwd_triton, experts_fwd_triton, supports_experts, supports_experts_backward

_backend.register("experts_swiglu", "triton", experts_fwd_triton, supports=supports_experts)
_backend.register("experts_swiglu_backward", "triton", experts_bwd_triton,
                  supports=supports_experts_backward)

__all__ = ["experts_fwd_triton", "experts_bwd_triton", "supports_experts", "supports_experts_backward"]
