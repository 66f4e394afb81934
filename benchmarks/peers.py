"""Peer MoE kernel libraries, used when importable (none is required; absent ones are skipped).

Each adapter computes the same layer as moe_paths (torch routing, then the peer's experts and
combine). Libraries that are importable but have no adapter here are only listed.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .moe_paths import LayerInputs, Path, torch_route

# Import names of libraries that ship MoE expert kernels.
KNOWN = ("scattermoe", "megablocks", "sonicmoe", "liger_kernel", "vllm", "grouped_gemm")


def importable() -> dict[str, bool]:
    found = {}
    for name in KNOWN:
        try:
            found[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found[name] = False
    return found


def _scattermoe_build(inp: LayerInputs):
    from scattermoe.parallel_experts import flatten_sort_count, parallel_linear

    E = inp.router_ED.shape[0]
    # ScatterMoE's expert weights are (E, out, in), viewed as (E, in, out) when called.
    w13_E2FD = torch.cat([inp.w_gate_EFD, inp.w_up_EFD], dim=1).detach().requires_grad_(True)

    def fwd():
        weights_TK, experts_TK = torch_route(inp.x_TD, inp.router_ED, inp.K, None)
        sorted_e, sorted_slot, offsets = flatten_sort_count(experts_TK, E)
        h = parallel_linear(inp.x_TD, w13_E2FD.permute(0, 2, 1), inp.K, sorted_e, sorted_slot,
                            offsets, grouped_out=True)
        g, u = h.chunk(2, dim=-1)
        return parallel_linear(F.silu(g) * u, inp.w_down_EDF.permute(0, 2, 1), 1, sorted_e,
                               sorted_slot, offsets, grouped_in=True,
                               gates=weights_TK.to(inp.x_TD.dtype))

    return fwd, [inp.x_TD, inp.router_ED, w13_E2FD, inp.w_down_EDF]


_ADAPTERS = {
    "scattermoe": lambda: Path("peer:scattermoe", _scattermoe_build, capturable=False,
                               supports_mask=False, detail="ScatterMoE parallel_linear"),
}


def peer_paths(device: torch.device) -> tuple[list[Path], dict[str, str]]:
    """Paths for importable peers with an adapter, and a status line for every known peer."""
    paths, status = [], {}
    for name, ok in importable().items():
        if not ok:
            status[name] = "not installed"
        elif device.type != "cuda":
            status[name] = "installed; GPU only"
        elif name in _ADAPTERS:
            paths.append(_ADAPTERS[name]())
            status[name] = "benchmarked"
        else:
            status[name] = "installed; no adapter"
    return paths, status
