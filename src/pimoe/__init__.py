"""pimoe: Mixture-of-Experts models with neural and computation experts."""

from pimoe.moe import MoEConfig, PiMoE, Router, RouterOutput, RoutingStats

__version__ = "0.1.0"
__all__ = ["MoEConfig", "PiMoE", "Router", "RouterOutput", "RoutingStats", "__version__"]
