"""Security and privacy: AES-GCM sealing of checkpoints and cache entries."""

from pimoe.privacy.crypto import IntegrityError, generate_key, load_key, open_sealed, seal

__all__ = ["IntegrityError", "generate_key", "load_key", "open_sealed", "seal"]
