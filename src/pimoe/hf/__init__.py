"""pimoe for Hugging Face transformers MoE models.

- ``experts_implementation="pimoe"``: pimoe's grouped expert kernel as a transformers experts
  backend (registered on import; :func:`enable` registers it again, idempotently).
- :func:`routing_report`: per-layer routing statistics and the load-balancing loss of any
  transformers MoE model or of a model built from pimoe ``PiMoE`` layers.
- :func:`check_families`: equivalence and speed of the backend on tiny models of each family.
- :func:`track_expert_load`: count the experts' loads so that ``pimoe.moe.update_routing_bias``
  trains the selection bias of DeepSeek-V3-style routers (``e_score_correction_bias``).
"""

from pimoe.hf.backend import enable, experts_layout, pimoe_experts_forward
from pimoe.hf.balance import track_expert_load
from pimoe.hf.families import FAMILIES, build_tiny, check_families
from pimoe.hf.report import LayerRouting, RoutingReport, routing_report

enable()

__all__ = [
    "FAMILIES",
    "LayerRouting",
    "RoutingReport",
    "build_tiny",
    "check_families",
    "enable",
    "experts_layout",
    "pimoe_experts_forward",
    "routing_report",
    "track_expert_load",
]
