"""Small Triton helpers built only on triton.language builtins.

triton.language's own sum, cumsum, sigmoid and zeros are @triton.jit functions, created when triton
is imported. If that import happened before TRITON_INTERPRET=1 was set (another module imported
triton first), the interpreter cannot call them. These helpers are created with the kernels, so
the kernels run in the interpreter whatever the import order, and they compile to the same code.
"""
import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def vsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def vcumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, _add)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))
