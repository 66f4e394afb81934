"""Benchmark of the full MoE layer (route + dispatch + experts + combine), forward and
forward+backward, flexkern's backends side by side with a per-expert loop, the best plain-PyTorch
path (torch._grouped_mm), importable peer libraries, and a dense matmul of the same FLOPs.

    python -m benchmarks.bench_moe [--quick] [--check] [--json PATH] [--png PATH]
                                   [--shapes a,b] [--backends triton,auto,loop,torch_gmm,...]

On a GPU: bf16, the shapes of benchmarks/shapes.py. On the CPU: a smoke run on tiny shapes in
float32 (reference backend; triton too under TRITON_INTERPRET=1).
Reported: ms (median), TFLOP/s (forward 6·T·K·D·F, forward+backward 18·T·K·D·F), share of the
dense ceiling, peak memory above the inputs, and at decode sizes the share of the weight-read
floor (bytes of the touched experts' weights / measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path as _FsPath

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(_FsPath(__file__).resolve().parent.parent))

import torch

from benchmarks import bench_routing, check, moe_paths, peers, report, shapes, timing
from benchmarks.moe_paths import LayerInputs, Path
from benchmarks.shapes import MoEShape


def pick_paths(device: torch.device, wanted: str | None) -> tuple[list[Path], dict, dict, bool]:
    """(layer paths, {duplicate: path it equals}, peer status, whether to time the dense
    ceiling), filtered by --backends (full names, or the part after "flexkern:")."""
    names = {n.strip() for n in (wanted or "").split(",") if n.strip()}

    def keep(name: str) -> bool:
        return not names or name in names or name.split(":", 1)[-1] in names

    fk, same = moe_paths.flexkern_paths(device, keep)
    peer_list, peer_status = peers.peer_paths(device)
    paths = fk + [p for p in moe_paths.torch_paths() + peer_list if keep(p.name)]
    return paths, same, peer_status, keep("dense")


def skip_reason(path: Path, shape: MoEShape, mode: str) -> str | None:
    if shape.masked_frac and not path.supports_mask:
        return "skipped: no expert mask support"
    if path.oracle and not shape.decode:
        return "skipped: reference on CUDA runs every expert over all rows (E x work); decode sizes only"
    if path.name == "loop" and not shape.loop:
        return "skipped: per-expert loop too slow at this size"
    if mode == "fwd+bwd" and not path.backward:
        return "skipped: forward only"
    return None


def touched_weight_bytes(inp: LayerInputs) -> int:
    """Bytes of the weights of the experts this routing touches (each read once)."""
    with torch.no_grad():
        _, experts_TK = moe_paths.torch_route(inp.x_TD, inp.router_ED, inp.K, None)
        used_E = torch.zeros(inp.router_ED.shape[0], dtype=torch.bool, device=experts_TK.device)
        used_E[experts_TK.reshape(-1)] = True
        if inp.mask_E is not None:
            used_E &= inp.mask_E
        n = int(used_E.sum())
    per_expert = sum(w[0].numel() * w.element_size() for w in inp.leaves[2:])
    return n * per_expert


class Runner:
    def __init__(self, device, dtype, quick: bool, budget_s: float, hbm_spec_Bps: float | None):
        self.device, self.dtype, self.quick = device, dtype, quick
        self.deadline = time.monotonic() + budget_s
        self.copy_Bps = timing.copy_bandwidth_Bps(device)
        self.hbm_spec_Bps = hbm_spec_Bps

    def reps(self, flops: float) -> dict:
        if self.device.type != "cuda":
            return {"warmup_ms": 0, "rep_ms": 20}
        if flops > 5e12 or self.quick:
            return {"warmup_ms": 5, "rep_ms": 30}
        if flops > 5e11:
            return {"warmup_ms": 10, "rep_ms": 50}
        return {"warmup_ms": 25, "rep_ms": 100}

    def measure(self, fn, flops, leaves=(), graph=False) -> dict:
        """Median time and peak memory of ``fn`` (replayed from a CUDA graph when ``graph``)."""
        out = {"peak_mib": timing.peak_memory_mb(fn, self.device, leaves)}
        timed, note = fn, ""
        if graph:
            try:
                timed = timing.capture_graph(fn)
            except Exception as exc:
                note, graph = f"graph capture failed ({type(exc).__name__}); eager", False
                torch.cuda.synchronize()
        out["ms"] = timing.bench_ms(timed, self.device, grad_to_none=list(leaves) or None, **self.reps(flops))
        out.update(graph=graph, note=note)
        return out

    def shape_rows(self, shape: MoEShape, paths: list[Path], dense: bool) -> list[dict]:
        dev = self.device
        cuda = dev.type == "cuda"
        inp = moe_paths.make_inputs(shape, dev, self.dtype)
        base = {"shape": shape.name, **{k: v for k, v in shape.as_dict().items() if k != "name"}}
        if shape.hot_share:  # the skew as routed, not only as asked for
            rows_E = moe_paths.expert_rows(inp)
            base["hot_expert_row_share"] = float(rows_E[0]) / float(rows_E.sum())
        floor_ms = None
        if shape.decode:
            nbytes = touched_weight_bytes(inp)
            floor_ms = nbytes / self.copy_Bps * 1e3
            base.update(touched_weight_bytes=nbytes, bw_floor_ms=floor_ms)
            if self.hbm_spec_Bps:  # the same floor at the spec bandwidth (lower still)
                base["hbm_spec_floor_ms"] = nbytes / self.hbm_spec_Bps * 1e3
        rows = []
        for mode in shape.modes:
            flops = shape.flops(mode)
            dense_ms = None
            if dense and not shape.decode:
                try:
                    r = self.measure(moe_paths.dense_ceiling(shape, mode, dev, self.dtype), flops)
                    dense_ms = r["ms"]
                    rows.append({**base, "mode": mode, "path": "dense", "status": "ok", **r,
                                 "tflops": flops / (r["ms"] * 1e9), "dense_share": 1.0,
                                 "note": "torch.mm, same GEMMs in one group"})
                except Exception as exc:
                    rows.append({**base, "mode": mode, "path": "dense", "status": _err(exc)})
                    _free(cuda)
            for path in paths:
                row = {**base, "mode": mode, "path": path.name, "detail": path.detail,
                       "experts_backend": path.key[2] if path.key else None}
                reason = skip_reason(path, shape, mode)
                if reason is None and time.monotonic() > self.deadline:
                    reason = "skipped: time budget spent"
                if reason:
                    rows.append({**row, "status": reason})
                    continue
                try:
                    fwd, leaves = path.build(inp)
                    if mode == "fwd":
                        def fn(fwd=fwd):
                            with torch.no_grad():
                                return fwd()
                        r = self.measure(fn, flops, graph=shape.decode and cuda and path.capturable)
                    else:
                        dy = torch.randn_like(inp.x_TD)

                        def fn(fwd=fwd, dy=dy):
                            fwd().backward(dy)
                        r = self.measure(fn, flops, leaves=leaves)
                    row.update(status="ok", **r, tflops=flops / (r["ms"] * 1e9))
                    if dense_ms:
                        row["dense_share"] = dense_ms / r["ms"]
                        row["dense_tflops"] = flops / (dense_ms * 1e9)
                    if floor_ms:
                        row["bw_floor_share"] = floor_ms / r["ms"]
                except Exception as exc:
                    row["status"] = _err(exc)
                finally:
                    for t in inp.leaves:
                        t.grad = None
                rows.append(row)
                _free(cuda)
        del inp
        _free(cuda)
        return rows


def _err(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {exc}"[:300]


def _free(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument("--check", action="store_true", help="compare every path with float32 on a slice")
    ap.add_argument("--check-tokens", type=int, default=256, help="tokens in the --check slice")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--png", help="write a bar chart here")
    ap.add_argument("--routing-json", help="also write the routing benchmark alone here")
    ap.add_argument("--shapes", help="comma-separated shape names (see benchmarks/shapes.py)")
    ap.add_argument("--backends", help="comma-separated paths: e.g. triton,auto,reference,loop,"
                    "torch_gmm,dense,peer:scattermoe (default: all available)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="cpu forces the smoke run even where a GPU exists")
    ap.add_argument("--no-routing", action="store_true", help="skip the routing+dispatch benchmark")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop starting new measurements after this many seconds")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    # bf16 on the GPU; float32 on the CPU (the Triton interpreter computes bf16 wrongly).
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        presets = shapes.GPU_QUICK_SHAPES if args.quick else shapes.GPU_SHAPES
    else:
        presets = shapes.CPU_SHAPES
    todo = shapes.select(presets, args.shapes)
    paths, same, peer_status, dense = pick_paths(device, args.backends)
    meta = report.environment(device)
    hbm = timing.hbm_spec_Bps(meta["gpu"]) if cuda else None
    runner = Runner(device, dtype, args.quick, args.budget_s, hbm)
    meta.update(dtype=str(dtype).replace("torch.", ""), quick=args.quick, peers=peer_status,
                copy_bandwidth_GBps=runner.copy_Bps / 1e9,
                hbm_spec_GBps=hbm / 1e9 if hbm else None,
                paths={p.name: p.detail for p in paths}, paths_same_as=same,
                flop_model={"fwd": "6*T*K*D*F", "fwd+bwd": "18*T*K*D*F"})
    print(f"device: {meta['gpu'] or 'cpu'}  torch {meta['torch']}  triton {meta['triton']}  "
          f"dtype {meta['dtype']}  copy bandwidth {runner.copy_Bps / 1e9:.0f} GB/s")
    for p in paths:
        print(f"  path {p.name:<20} {p.detail}")
    for dup, orig in same.items():
        print(f"  path {dup:<20} same backends as {orig}: not timed twice")
    print(f"  peers: {peer_status}")
    if not cuda:
        print("no GPU: smoke run on tiny shapes (timings are not meaningful)")

    t0 = time.monotonic()
    layer, checks = [], []
    for shape in todo:
        ts = time.monotonic()
        layer += runner.shape_rows(shape, paths, dense)
        if args.check and time.monotonic() < runner.deadline:
            inp = moe_paths.make_inputs(shape, device, dtype)
            checks += [{"shape": shape.name, **r} for r in check.check_paths(paths, inp, args.check_tokens)]
            del inp
            _free(cuda)
        print(f"  {shape.name}: {time.monotonic() - ts:.1f} s", flush=True)
        if args.json:  # partial results survive a run that is cut short
            report.write_json(args.json, {"meta": meta, "layer": layer, "check": checks,
                                          "routing": [], "goals": [], "partial": True})
    routing = [] if args.no_routing else bench_routing.run(device)
    meta["elapsed_s"] = time.monotonic() - t0

    report.print_layer_table(layer)
    if checks:
        report.print_check_table(checks)
    if routing:
        bench_routing.print_table(routing)
    goal_rows = report.goals(layer, routing) if cuda else []
    if goal_rows:
        report.print_goals(goal_rows)
    result = {"meta": meta, "layer": layer, "check": checks, "routing": routing, "goals": goal_rows,
              "partial": False}
    if args.json:
        report.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.routing_json and routing:
        report.write_json(args.routing_json, {"meta": meta, "routing": routing})
        print(f"wrote {args.routing_json}")
    if args.png:
        title = f"flexkern MoE benchmark — {meta['gpu'] or 'cpu'}, torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}"
        report.plot_png(args.png, layer, routing, title)
        print(f"wrote {args.png}")
    failed = [c for c in checks if c["status"] == "FAIL"]
    print(f"done in {meta['elapsed_s']:.1f} s" + (f"; {len(failed)} check(s) FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
