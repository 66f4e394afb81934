"""The CUDA extension flexkern._C: built where nvcc exists, importable without a GPU, and its
host-side argument checks and workspace sizing (which run without a device)."""
import importlib
import os
import shutil

import pytest
import torch

from flexkern.ops import backend


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc")
                                    if os.path.exists(os.path.join(home, "bin", "nvcc")) else None)


pytestmark = pytest.mark.skipif(
    _nvcc() is None and importlib.util.find_spec("flexkern._C") is None,
    reason="nvcc not found, so flexkern._C is not built (the package runs without it)",
)


@pytest.fixture(scope="module")
def C():
    try:
        return importlib.import_module("flexkern._C")
    except ImportError as exc:
        pytest.fail(f"nvcc is present but flexkern._C is not built or does not load ({exc}); build "
                    "it with: FLEXKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation")


def test_extension_exports_the_kernels(C):
    for name in ("route_topk", "dispatch", "dispatch_workspace_bytes"):
        assert callable(getattr(C, name)), name
    assert not hasattr(C, "tile_schedule")  # removed: the grouped GEMMs schedule their own tiles
    assert (C.ROUTE_MAX_EXPERTS, C.ROUTE_MAX_TOP_K, C.DISPATCH_MAX_EXPERTS) == (256, 16, 1024)
    assert C.ROUTE_MAX_GROUPS == 32
    assert sorted((C.FLOAT32, C.FLOAT16, C.BFLOAT16)) == [0, 1, 2]


def test_cuda_backend_registers_route_and_dispatch(C):
    import flexkern.cuda  # noqa: F401  (raises ImportError if the extension cannot load)

    assert "cuda" in backend.available("route") and "cuda" in backend.available("dispatch")
    # A preference, not an order: CPU tensors fall back to the reference, and explain says why.
    with pytest.warns(UserWarning, match="needs CUDA tensors"):
        assert backend.lookup("route", "cuda", torch.device("cpu"))[0] == "reference"
    x, r = torch.randn(3, 4), torch.randn(5, 4)
    d = backend.explain("route", x, r, 2, backend="cuda")
    assert d.backend == "reference" and "needs CUDA tensors" in str(d)
    # experts_swiglu has no cuda implementation: that is what explain says, not "not built".
    import flexkern

    disp = flexkern.dispatch(torch.zeros(3, 1, dtype=torch.int32), 2)
    ws = [torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 6)]
    d = flexkern.explain("experts_swiglu", x, *ws, disp, torch.ones(3, 1), backend="cuda")
    assert d.backend == "reference" and "does not implement experts_swiglu" in str(d)
    assert "not built" not in str(d)
    y = flexkern.experts_swiglu(x, *ws, disp, torch.ones(3, 1), backend="cuda")
    torch.testing.assert_close(y, flexkern.experts_swiglu(x, *ws, disp, torch.ones(3, 1)))


def test_dispatch_workspace_sizing(C):
    assert C.dispatch_workspace_bytes(0, 4, 8) == 0
    assert C.dispatch_workspace_bytes(512, 8, 64) == 0  # one block sorts small inputs
    # large inputs: int32 per-warp counts (E x units) plus E totals; units of 128 slots at least
    assert C.dispatch_workspace_bytes(65536, 8, 64) == (524288 // 128 + 1) * 64 * 4
    units = -(-1_000_000 // 256)  # 1M slots: 256-slot units keep the scan at <= 4096 units
    assert C.dispatch_workspace_bytes(125_000, 8, 16) == (units + 1) * 16 * 4


def test_bad_arguments_raise_before_any_launch(C):
    route_args = dict(logits_TE=0, dtype=0, bias_E=0, mask_E=0, T=4, E=8, K=2, reroute=True,
                      renormalize=False, weights_TK=0, experts_TK=0, lse_T=0, counts_E=0, stream=0)
    for bad, match in [(dict(E=257), "E <= 256"), (dict(K=17, E=32), "K <="), (dict(K=9), "K <="),
                       (dict(dtype=3), "dtype"), (dict(), "non-null"), (dict(scoring=2), "scoring"),
                       (dict(routed_scaling=0.0), "routed_scaling"),
                       (dict(routed_scaling=float("inf")), "routed_scaling"),
                       (dict(topk_group=2), "topk_group"), (dict(n_group=3), "n_group"),
                       (dict(n_group=8), "n_group"), (dict(n_group=64, E=128), "n_group"),
                       (dict(n_group=4, topk_group=5), "topk_group"),
                       (dict(n_group=4, topk_group=1, K=3), "topk_group")]:
        with pytest.raises(ValueError, match=match):
            C.route_topk(**{**route_args, **bad})
    disp_args = dict(experts_TK=0, ids_int64=False, mask_E=0, T=4, K=2, E=8, workspace=0,
                     workspace_bytes=0, offsets_E1=0, token_of_row_N=0, slot_of_row_N=0,
                     row_of_slot_TK=0, stream=0)
    for bad, match in [(dict(E=1025), "E <= 1024"), (dict(T=2**30, K=4), "int32"),
                       (dict(T=65536, K=8, E=64), "workspace"), (dict(), "offsets")]:
        with pytest.raises(ValueError, match=match):
            C.dispatch(**{**disp_args, **bad})
