"""Real pretrained models: offline loading of packaged checkpoints, cached as safetensors; dense ->
MoE upcycling (copy / split) with router training."""

from pimoe.models.pretrained import (
    REGISTRY,
    PretrainedSpec,
    cache_path,
    cache_root,
    gguf_path,
    load_pretrained,
    pretrained_names,
)
from pimoe.models.router_training import load_routers, save_routers, train_routers
from pimoe.models.upcycle import parameter_counts, set_top_k, upcycle
from pimoe.models.upcycle_cluster import capture_mlp_inputs
from pimoe.models.upcycle_refit import refit_experts

__all__ = [
    "REGISTRY",
    "PretrainedSpec",
    "cache_path",
    "cache_root",
    "capture_mlp_inputs",
    "gguf_path",
    "load_pretrained",
    "load_routers",
    "parameter_counts",
    "pretrained_names",
    "refit_experts",
    "save_routers",
    "set_top_k",
    "train_routers",
    "upcycle",
]
