"""--check: each path's output and input gradient on a slice of tokens, against float32.

The oracle is flexkern's reference ops run in float32. A path passes when its relative error is at
most twice the error of the same reference run in the benchmark dtype, plus a small floor.
"""
from __future__ import annotations

import torch

import flexkern

from .moe_paths import LayerInputs, Path

FLOOR = 1e-5


def _reference(inp: LayerInputs, dtype: torch.dtype, dy_TD: torch.Tensor):
    """(y, dx) of the reference ops with every input cast to ``dtype``."""
    x = inp.x_TD.detach().to(dtype).requires_grad_(True)
    router, wg, wu, wd = (t.detach().to(dtype) for t in inp.leaves[1:])
    E = router.shape[0]
    weights_TK, experts_TK, _ = flexkern.route(x, router, inp.K, None, inp.mask_E, "drop",
                                               backend="reference")
    disp = flexkern.dispatch(experts_TK, E, inp.mask_E, backend="reference", validate=False)
    y = flexkern.experts_swiglu(x, wg, wu, wd, disp, weights_TK, None, backend="reference")
    y.backward(dy_TD.to(dtype))
    return y.detach().float(), x.grad.float()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_paths(paths: list[Path], inp: LayerInputs, tokens: int, seed: int = 1) -> list[dict]:
    """One row per path: relative errors of y and dx, their tolerances and the verdict."""
    inp = inp.sliced(min(tokens, inp.x_TD.shape[0]))
    g = torch.Generator(device="cpu").manual_seed(seed)
    dy = torch.randn(inp.x_TD.shape, generator=g).to(inp.x_TD.device)
    y_ref, dx_ref = _reference(inp, torch.float32, dy)
    y_dt, dx_dt = _reference(inp, inp.x_TD.dtype, dy)
    tol_y = 2 * rel_err(y_dt, y_ref) + FLOOR
    tol_dx = 2 * rel_err(dx_dt, dx_ref) + FLOOR
    rows = []
    for path in paths:
        row = {"path": path.name, "tokens": inp.x_TD.shape[0], "tol_y": tol_y, "tol_dx": tol_dx}
        if inp.mask_E is not None and not path.supports_mask:
            rows.append({**row, "status": "skipped: no expert mask support"})
            continue
        try:
            fwd, leaves = path.build(inp)
            for t in leaves:
                t.grad = None
            y = fwd()
            row["err_y"] = rel_err(y.detach(), y_ref)
            ok = row["err_y"] <= tol_y
            if path.backward:
                y.backward(dy.to(y.dtype))
                row["err_dx"] = rel_err(inp.x_TD.grad, dx_ref)
                ok = ok and row["err_dx"] <= tol_dx
            row["status"] = "ok" if ok else "FAIL"
        except Exception as exc:  # a broken path is reported, not fatal
            row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
        finally:
            for t in inp.leaves:
                t.grad = None
        rows.append(row)
    return rows
