"""Fast inference: the inference cache (memory policies, persistent and encrypted disk tier)."""

from pimoe.infer.cache import CacheStats, InferenceCache, make_key
from pimoe.infer.policies import (
    Cache,
    FIFOCache,
    LFUCache,
    LRUCache,
    TinyLFUCache,
    TTLCache,
    belady_hits,
    make_policy,
    simulate_hits,
)

__all__ = [
    "Cache", "CacheStats", "FIFOCache", "InferenceCache", "LFUCache", "LRUCache", "TTLCache", "TinyLFUCache",
    "belady_hits", "make_key", "make_policy", "simulate_hits",
]
