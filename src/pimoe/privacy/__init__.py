"""Security and privacy.

Submodules (import them directly; each loads its third-party library only when used):
``crypto`` (AES-GCM sealing of checkpoints and cache entries), ``dp`` (DP-SGD through Opacus),
``budget`` (a data owner's DP budget persisted across restarts),
``secagg`` (secure aggregation by pairwise masking), ``he`` (TenSEAL CKKS aggregation),
``checkpoint`` (encrypted state dicts), ``audit`` (append-only hash-chained audit log).
"""

from pimoe.privacy.crypto import IntegrityError, generate_key, load_key, open_sealed, seal

__all__ = ["IntegrityError", "generate_key", "load_key", "open_sealed", "seal"]
