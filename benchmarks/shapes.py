"""Benchmark shapes of the MoE layer (T tokens, D d_model, F expert width, E experts, K top-k).

FLOP model (SwiGLU experts, routing and combine not counted): forward 6·T·K·D·F,
forward+backward 18·T·K·D·F.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    name: str
    T: int
    D: int
    F: int
    E: int
    K: int
    masked_frac: float = 0.0   # share of experts masked (drop mode) — every other expert
    decode: bool = False       # inference size: forward only, timed through CUDA-graph replay
    loop: bool = True          # time the per-expert Python loop too (slow at some sizes)

    @property
    def routed_rows(self) -> int:
        """Rows the experts actually compute: T*K less the share dropped by the mask (expected
        value under the benchmark's uniform routing)."""
        return round(self.T * self.K * (1.0 - self.masked_frac))

    def flops(self, mode: str) -> float:
        """Useful FLOPs: forward 6·N·D·F, forward+backward 18·N·D·F with N the routed rows."""
        per = {"fwd": 6, "fwd+bwd": 18}[mode]
        return float(per) * self.routed_rows * self.D * self.F

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd",) if self.decode else ("fwd", "fwd+bwd")

    def as_dict(self) -> dict:
        return {"name": self.name, "T": self.T, "D": self.D, "F": self.F, "E": self.E, "K": self.K,
                "masked_frac": self.masked_frac, "decode": self.decode}


OLMOE = dict(D=2048, F=1024, E=64, K=8)

GPU_SHAPES = (
    MoEShape("olmoe", T=16384, **OLMOE),
    MoEShape("olmoe-drop50", T=16384, masked_frac=0.5, **OLMOE),
    MoEShape("mixtral", T=8192, D=4096, F=14336, E=8, K=2),
    MoEShape("flexolmo-7x7b", T=8192, D=4096, F=11008, E=8, K=4),
    MoEShape("olmoe-decode-1", T=1, decode=True, **OLMOE),
    MoEShape("olmoe-decode-16", T=16, decode=True, **OLMOE),
    MoEShape("olmoe-decode-64", T=64, decode=True, **OLMOE),
)

# --quick on the GPU: one training shape and one decode size, smaller token counts.
GPU_QUICK_SHAPES = (
    MoEShape("olmoe-4k", T=4096, **OLMOE),
    MoEShape("olmoe-4k-drop50", T=4096, masked_frac=0.5, **OLMOE),
    MoEShape("olmoe-decode-64", T=64, decode=True, **OLMOE),
)

# The CPU smoke run: tiny sizes that finish in seconds.
CPU_SHAPES = (
    MoEShape("tiny", T=64, D=32, F=64, E=8, K=2),
    MoEShape("tiny-drop50", T=64, D=32, F=64, E=8, K=2, masked_frac=0.5),
    MoEShape("tiny-decode-4", T=4, D=32, F=64, E=8, K=2, decode=True),
)


def select(shapes: tuple[MoEShape, ...], names: str | None) -> tuple[MoEShape, ...]:
    """Shapes whose name is in the comma-separated ``names`` (all when None)."""
    if not names:
        return shapes
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name: s for s in GPU_SHAPES + GPU_QUICK_SHAPES + CPU_SHAPES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {sorted(known)}")
    return tuple(known[n] for n in wanted)
