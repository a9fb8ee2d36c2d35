"""pimoe.moe: the core. Router decides, dispatcher executes, PiMoE composes them."""

from pimoe.moe.backends import experts_backends, register_experts_backend
from pimoe.moe.config import MoEConfig
from pimoe.moe.dispatch import dispatch_combine
from pimoe.moe.experts import EXPERT_PRESETS, FFN, ExpertList, StackedExperts, SwiGLU, make_expert
from pimoe.moe.layer import PiMoE
from pimoe.moe.losses import load_balancing_loss, router_z_loss
from pimoe.moe.router import Router, RouterOutput
from pimoe.moe.stats import RoutingStats

__all__ = [
    "EXPERT_PRESETS", "FFN", "ExpertList", "MoEConfig", "PiMoE", "Router", "RouterOutput", "RoutingStats",
    "StackedExperts", "SwiGLU", "dispatch_combine", "load_balancing_loss", "make_expert",
    "experts_backends", "register_experts_backend", "router_z_loss",
]
