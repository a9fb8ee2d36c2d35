"""Real pretrained models: offline loading of packaged checkpoints, cached as safetensors."""

from pimoe.models.pretrained import (
    REGISTRY,
    PretrainedSpec,
    cache_path,
    cache_root,
    gguf_path,
    load_pretrained,
    pretrained_names,
)

__all__ = [
    "REGISTRY",
    "PretrainedSpec",
    "cache_path",
    "cache_root",
    "gguf_path",
    "load_pretrained",
    "pretrained_names",
]
