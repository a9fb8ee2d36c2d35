"""Fast inference: engine (compile, autocast, cache), micro-batching, and the inference cache."""

from pimoe.infer.batching import BatcherStats, MicroBatcher, lengths_to_mask
from pimoe.infer.cache import CacheStats, InferenceCache, make_key
from pimoe.infer.engine import EngineStats, InferenceConfig, InferenceEngine
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
    "BatcherStats", "Cache", "CacheStats", "EngineStats", "FIFOCache", "InferenceCache", "InferenceConfig",
    "InferenceEngine", "LFUCache", "LRUCache", "MicroBatcher", "TTLCache", "TinyLFUCache", "belady_hits",
    "lengths_to_mask", "make_key", "make_policy", "simulate_hits",
]
