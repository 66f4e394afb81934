"""Routing + dispatch: flexkern (CUDA kernels when built) against the plain-PyTorch composite.

    composite:  logits = x·Wᵀ (float32), gate, topk, argsort, bincount, cumsum, token = order // K
    flexkern:   flexkern.route + flexkern.dispatch (backend "cuda" when registered, else auto)

Two gates: "softmax" (FlexOlmo, OLMoE) and "deepseek-v3" (sigmoid scores, a selection-only score
bias, 8 groups of which the 4 best by their top-2 sum are eligible, renormalised, x 2.5; its
composite is transformers' DeepseekV3TopkRouter written out).

Large T is timed eagerly; decode sizes (T <= 64) through CUDA-graph replay, where bincount is
replaced by a scatter_add count because bincount reads its maximum back to the host.

    python -m benchmarks.bench_routing [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path as _FsPath

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(_FsPath(__file__).resolve().parent.parent))

import torch

import flexkern
from flexkern.ops import backend as fk_backend

from benchmarks import report, timing

# (T, D, E, K, gate)
GPU_SIZES = ((16384, 2048, 64, 8, "softmax"), (1, 2048, 64, 8, "softmax"), (16, 2048, 64, 8, "softmax"),
             (64, 2048, 64, 8, "softmax"), (16384, 2048, 256, 8, "deepseek-v3"), (64, 2048, 256, 8, "deepseek-v3"))
CPU_SIZES = ((256, 32, 8, 2, "softmax"), (4, 32, 8, 2, "softmax"), (256, 32, 16, 4, "deepseek-v3"))
DECODE_T = 64
DEEPSEEK_V3 = dict(scoring="sigmoid", n_group=8, topk_group=4, routed_scaling=2.5, renormalize=True)


def gate_settings(gate: str, E: int, device) -> dict:
    """flexkern.route's keyword settings for a gate (the score bias fixed per E)."""
    if gate == "softmax":
        return {}
    bias = torch.randn(E, generator=torch.Generator().manual_seed(E)) * 0.05
    return {**DEEPSEEK_V3, "score_bias_E": bias.to(device)}


def deepseek_v3_topk(logits_TE, K: int, g: dict):
    """transformers' DeepseekV3TopkRouter after the logits: (weights_TK, experts_TK)."""
    T, E = logits_TE.shape
    G, TG = g["n_group"], g["topk_group"]
    scores_TE = logits_TE.sigmoid()
    choice_TE = scores_TE + g["score_bias_E"]
    group_TG = choice_TE.view(T, G, E // G).topk(2, dim=-1)[0].sum(-1)
    keep_TG = torch.zeros_like(group_TG).scatter_(1, group_TG.topk(TG, dim=-1, sorted=False)[1], 1)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E).bool()
    experts_TK = choice_TE.masked_fill(~keep_TE, float("-inf")).topk(K, dim=-1, sorted=False)[1]
    weights_TK = scores_TE.gather(1, experts_TK)
    weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return weights_TK * g["routed_scaling"], experts_TK


def composite(x_TD, router_ED, K: int, capturable: bool, gate: dict | None = None):
    E = router_ED.shape[0]
    logits_TE = x_TD.float() @ router_ED.float().t()
    if gate:
        weights_TK, experts_TK = deepseek_v3_topk(logits_TE, K, gate)
    else:
        weights_TK, experts_TK = torch.softmax(logits_TE, dim=-1).topk(K, dim=-1)
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    if capturable:
        counts_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))
    else:
        counts_E = torch.bincount(flat_N, minlength=E)
    offsets_E = torch.cumsum(counts_E, 0)
    return weights_TK, order_N, order_N // K, offsets_E


def flexkern_backends(device: torch.device) -> tuple[str, str]:
    """(route backend, dispatch backend): "cuda" where registered, else what auto gives."""
    out = []
    for op in ("route", "dispatch"):
        name = "cuda" if "cuda" in fk_backend.available(op) and device.type == "cuda" else "auto"
        out.append(fk_backend.lookup(op, name, device)[0])
    return out[0], out[1]


def flexkern_rd(x_TD, router_ED, K: int, route_b: str, disp_b: str, gate: dict | None = None):
    weights_TK, experts_TK, _ = flexkern.route(x_TD, router_ED, K, backend=route_b, **(gate or {}))
    return flexkern.dispatch(experts_TK, router_ED.shape[0], None, backend=disp_b, validate=False)


def _time(fn, device, decode: bool) -> tuple[float, bool, str]:
    """(microseconds, graph replayed?, note)."""
    note = ""
    if decode and device.type == "cuda":
        try:
            return timing.bench_ms(timing.capture_graph(fn), device) * 1e3, True, note
        except Exception as exc:
            note = f"graph capture failed ({type(exc).__name__}); eager"
            torch.cuda.synchronize()
    return timing.bench_ms(fn, device, rep_ms=50 if device.type == "cuda" else 20) * 1e3, False, note


def run(device: torch.device, sizes=None, dtype=None) -> list[dict]:
    """One row per (size, path) with time in microseconds and flexkern's speed-up."""
    if sizes is None:
        sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    route_b, disp_b = flexkern_backends(device)
    rows = []
    for T, D, E, K, gate_name in sizes:
        g = torch.Generator(device="cpu").manual_seed(T)
        x = torch.randn(T, D, generator=g).to(device, dtype)
        router = (torch.randn(E, D, generator=g) * D**-0.5).to(device, dtype)
        gate = gate_settings(gate_name, E, device)
        decode = T <= DECODE_T
        base = {"T": T, "D": D, "E": E, "K": K, "gate": gate_name}
        results = {}
        for name, fn in (
            ("torch_composite", lambda: composite(x, router, K, capturable=decode, gate=gate)),
            ("flexkern", lambda: flexkern_rd(x, router, K, route_b, disp_b, gate)),
        ):
            try:
                with torch.no_grad():
                    us, graph, note = _time(fn, device, decode)
                results[name] = us
                row = {**base, "path": name, "us": us, "graph": graph, "note": note, "status": "ok"}
            except Exception as exc:
                row = {**base, "path": name, "status": f"error: {type(exc).__name__}: {exc}"[:300]}
            if name == "flexkern":
                row["backend"] = f"route={route_b} dispatch={disp_b}"
            rows.append(row)
        if len(results) == 2:
            rows[-1]["speedup"] = results["torch_composite"] / results["flexkern"]
    return rows


def print_table(rows: list[dict]) -> None:
    print("\nrouting + dispatch")
    print(f"{'T':>6} {'E':>4} {'K':>3} {'gate':<12} {'path':<16} {'us':>10} {'graph':>6} {'speedup':>8}  note")
    for r in rows:
        head = f"{r['T']:>6} {r['E']:>4} {r['K']:>3} {r.get('gate', 'softmax'):<12} {r['path']:<16}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}")
            continue
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        note = r.get("backend", "") + (" " + r["note"] if r.get("note") else "")
        print(f"{head} {r['us']:>10.1f} {str(r['graph']):>6} {sp:>8}  {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = None
    if args.quick:
        sizes = (GPU_SIZES[0], GPU_SIZES[-1]) if device.type == "cuda" else CPU_SIZES[-1:]
    rows = run(device, sizes)
    print_table(rows)
    if args.json:
        report.write_json(args.json, {"meta": report.environment(device), "routing": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
