"""pimoe.moe: the core. Router decides, dispatcher executes, PiMoE composes them."""

from pimoe.moe.backends import experts_backends, register_experts_backend
from pimoe.moe.balance import attach_bias_update, set_balance, update_routing_bias
from pimoe.moe.config import MoEConfig
from pimoe.moe.dispatch import dispatch_combine
from pimoe.moe.experts import EXPERT_PRESETS, FFN, ExpertList, StackedExperts, SwiGLU, make_expert
from pimoe.moe.layer import PiMoE
from pimoe.moe.lora import (
    LoRAConfig,
    add_lora,
    load_lora,
    merge_and_unload,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from pimoe.moe.losses import load_balancing_loss, router_z_loss
from pimoe.moe.prepack import pack_experts_, unpack_experts_
from pimoe.moe.router import Router, RouterOutput
from pimoe.moe.stats import RoutingStats

__all__ = [
    "EXPERT_PRESETS",
    "FFN",
    "ExpertList",
    "LoRAConfig",
    "MoEConfig",
    "PiMoE",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "StackedExperts",
    "SwiGLU",
    "add_lora",
    "attach_bias_update",
    "dispatch_combine",
    "experts_backends",
    "load_balancing_loss",
    "load_lora",
    "make_expert",
    "merge_and_unload",
    "merge_lora",
    "pack_experts_",
    "register_experts_backend",
    "router_z_loss",
    "save_lora",
    "set_balance",
    "unmerge_lora",
    "unpack_experts_",
    "update_routing_bias",
]
