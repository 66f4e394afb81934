"""Benchmark shapes of the MoE layer (T tokens, D d_model, F expert width, E experts, K top-k).

FLOP model (SwiGLU experts, routing and combine not counted): forward 6·T·K·D·F,
forward+backward 18·T·K·D·F.

Routing is uniform in expectation (random router), except for a skewed shape (``hot_share``):
its inputs are built so that expert 0 is in the top-k of ``hot_share·K·T`` tokens, exactly
(moe_paths.make_inputs); at K=2 and hot_share=0.5 every token picks it and it gets half the rows.
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
    hot_share: float = 0.0     # share of the routed rows forced to expert 0 (skewed routing)

    def __post_init__(self):
        if not 0.0 <= self.hot_share <= 1.0 / self.K:
            # expert 0 can appear at most once per token: at most T of the T*K rows
            raise ValueError(f"hot_share must be in [0, 1/K] = [0, {1 / self.K:.3g}], got {self.hot_share}")
        if not 0.0 <= self.masked_frac < 1.0:
            raise ValueError(f"masked_frac must be in [0, 1), got {self.masked_frac}")

    @property
    def hot_tokens(self) -> int:
        """Tokens whose top-k is forced to include expert 0."""
        return round(self.hot_share * self.T * self.K)

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
                "masked_frac": self.masked_frac, "decode": self.decode, "hot_share": self.hot_share}


OLMOE = dict(D=2048, F=1024, E=64, K=8)
MIXTRAL = dict(D=4096, F=14336, E=8, K=2)
QWEN3 = dict(D=2048, F=768, E=128, K=8)   # Qwen3-MoE-like: fine-grained, many narrow experts

GPU_SHAPES = (
    MoEShape("olmoe", T=16384, **OLMOE),
    MoEShape("olmoe-drop50", T=16384, masked_frac=0.5, **OLMOE),
    MoEShape("mixtral", T=8192, **MIXTRAL),
    MoEShape("flexolmo-7x7b", T=8192, D=4096, F=11008, E=8, K=4),
    # one expert gets half the rows (every token's top-2 holds expert 0), the other 7 share the rest
    MoEShape("mixtral-skew50", T=8192, hot_share=0.5, **MIXTRAL),
    # 128 experts: the per-expert loop's 128 host synchronisations per call are not timed
    MoEShape("qwen3", T=16384, loop=False, **QWEN3),
    MoEShape("olmoe-decode-1", T=1, decode=True, **OLMOE),
    MoEShape("olmoe-decode-16", T=16, decode=True, **OLMOE),
    MoEShape("olmoe-decode-64", T=64, decode=True, **OLMOE),
)

# --quick on the GPU: one training shape and one decode size, smaller token counts.
GPU_QUICK_SHAPES = (
    MoEShape("olmoe-4k", T=4096, **OLMOE),
    MoEShape("olmoe-4k-drop50", T=4096, masked_frac=0.5, **OLMOE),
    MoEShape("mixtral-skew50-2k", T=2048, hot_share=0.5, **MIXTRAL),
    MoEShape("qwen3-4k", T=4096, loop=False, **QWEN3),
    MoEShape("olmoe-decode-64", T=64, decode=True, **OLMOE),
)

# The CPU smoke run: tiny sizes that finish in seconds.
CPU_SHAPES = (
    MoEShape("tiny", T=64, D=32, F=64, E=8, K=2),
    MoEShape("tiny-drop50", T=64, D=32, F=64, E=8, K=2, masked_frac=0.5),
    MoEShape("tiny-skew50", T=64, D=32, F=64, E=8, K=2, hot_share=0.5),
    MoEShape("tiny-qwen3", T=32, D=32, F=16, E=16, K=8),
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
