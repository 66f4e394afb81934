from .moe import Z_LOSS_WEIGHT, Experts, FlexMoE, Router

__all__ = ["FlexMoE", "Router", "Experts", "Z_LOSS_WEIGHT"]
