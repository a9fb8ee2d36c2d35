"""pimoe for Hugging Face transformers MoE models.

- ``experts_implementation="pimoe"``: pimoe's grouped expert kernel as a transformers experts
  backend (registered on import; :func:`enable` registers it again, idempotently).
- :func:`routing_report`: per-layer routing statistics and the load-balancing loss of any
  transformers MoE model or of a model built from pimoe ``PiMoE`` layers.
- :func:`check_families`: equivalence and speed of the backend on tiny models of each family.
"""

from pimoe.hf.backend import enable, experts_layout, pimoe_experts_forward

enable()

__all__ = ["enable", "experts_layout", "pimoe_experts_forward"]
