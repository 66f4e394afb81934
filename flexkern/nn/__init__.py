from .moe import Experts, FlexMoE, Router

__all__ = ["FlexMoE", "Router", "Experts"]
