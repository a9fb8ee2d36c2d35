"""Fast inference: engine (compile, autocast, cache), micro-batching, the inference cache, and text
generation with continuous batching.

Importing ``pimoe.infer`` needs only the base install; the cache's hashing and disk tier
(``xxhash``, ``diskcache``, ``cryptography``) and the HTTP server (``fastapi``, ``uvicorn``,
``prometheus_client``) come with ``pip install "pimoe[serve]"`` and are imported when used.
"""

from pimoe.infer.batching import BatcherStats, MicroBatcher, lengths_to_mask
from pimoe.infer.cache import CacheStats, InferenceCache, make_key
from pimoe.infer.decode_batch import DecodeBatch, GenerationModel, TextModel
from pimoe.infer.engine import EngineStats, InferenceConfig, InferenceEngine
from pimoe.infer.generation import (
    EngineClosed,
    EngineFull,
    GenerationEngine,
    GenerationEvent,
    GenerationStats,
    SamplingParams,
    TextGenerator,
)
from pimoe.infer.hit_rates import belady_hits, simulate_hits
from pimoe.infer.lm_models import HFGenerationModel, open_generation_model
from pimoe.infer.pimoe_lm import PiMoEGenerationModel
from pimoe.infer.policies import (
    Cache,
    FIFOCache,
    LFUCache,
    LRUCache,
    TinyLFUCache,
    TTLCache,
    make_policy,
)

__all__ = [
    "BatcherStats",
    "Cache",
    "CacheStats",
    "DecodeBatch",
    "EngineClosed",
    "EngineFull",
    "EngineStats",
    "FIFOCache",
    "GenerationEngine",
    "GenerationEvent",
    "GenerationModel",
    "GenerationStats",
    "HFGenerationModel",
    "InferenceCache",
    "InferenceConfig",
    "InferenceEngine",
    "LFUCache",
    "LRUCache",
    "MicroBatcher",
    "PiMoEGenerationModel",
    "SamplingParams",
    "TTLCache",
    "TextGenerator",
    "TextModel",
    "TinyLFUCache",
    "belady_hits",
    "lengths_to_mask",
    "make_key",
    "make_policy",
    "open_generation_model",
    "simulate_hits",
]
