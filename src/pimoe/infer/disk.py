"""Persistent disk tier of :class:`~pimoe.infer.cache.InferenceCache`, on ``diskcache``.

Why diskcache rather than raw sqlite3: it is sqlite underneath (one transaction per write, so a
crash leaves the old entry or the new one), adds what we would otherwise write by hand (a byte
budget with culling, per-entry expiry, thread- and process-safe access, large values in
side files that are written before the row that points at them is committed) and stores
``bytes`` values raw, so nothing on disk is ever unpickled.

Entry format (``payload`` = ``torch.save`` bytes, read back with ``weights_only=True``):
  plain:     ``0x00 || xxh3_64(key || 0x00 || payload) (8 bytes) || payload``
  encrypted: ``pimoe.privacy.crypto.seal(key, payload, associated_data=cache key)``
The checksum catches accidental corruption; only the AES-GCM tag stops a deliberate change. With
the cache key as associated data, an entry copied under another key fails either check.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import diskcache
import torch
import xxhash

from pimoe.privacy.crypto import IntegrityError, open_sealed, seal

logger = logging.getLogger("pimoe.infer.cache")

MISSING = object()
PLAIN = b"\x00"
AuditHook = Callable[[str, Mapping[str, object]], None]
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


class CorruptEntry(ValueError):
    """A disk entry that cannot be read back (bad checksum, unknown format, failed deserialization)."""


def check_storable(value: Any) -> None:
    """Raise TypeError unless ``value`` round-trips through ``torch.load(weights_only=True)``:
    dense tensors, plain scalars, str, bytes, None, and tuples/lists/dicts (str/int keys) of them."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"the disk tier stores dense tensors only, got layout {value.layout}")
    elif isinstance(value, (tuple, list)):
        for item in value:
            check_storable(item)
    elif isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"dict keys must be str or int for the disk tier, got {type(k).__name__}")
            check_storable(item)
    elif not isinstance(value, _SCALARS):
        raise TypeError(
            f"the disk tier stores tensors, scalars, str, bytes, None and tuples/lists/dicts of them; got {type(value).__name__}"
        )


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in ``value``, rebuilding tuples, lists and dicts (as plain ones)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes, so ``torch.save`` does not write a larger base storage."""
    t = t.detach()
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone(memory_format=torch.contiguous_format)


def _checksum(key: str, payload: bytes) -> bytes:
    h = xxhash.xxh3_64(key.encode())
    h.update(b"\x00")
    h.update(payload)
    return h.digest()


def encode_entry(key: str, value: Any, encrypt_key: bytes | None = None) -> bytes:
    """Serialize ``value`` for the disk under cache key ``key`` (sealed if ``encrypt_key``)."""
    buffer = io.BytesIO()
    torch.save(map_tensors(value, _compact), buffer)
    payload = buffer.getvalue()
    if encrypt_key is not None:
        return seal(encrypt_key, payload, associated_data=key.encode())
    return PLAIN + _checksum(key, payload) + payload


def decode_entry(key: str, blob: bytes, encrypt_key: bytes | None = None) -> Any:
    """Inverse of :func:`encode_entry`; IntegrityError if a sealed entry does not authenticate,
    CorruptEntry for any other unreadable entry."""
    if encrypt_key is not None:
        payload = open_sealed(encrypt_key, blob, associated_data=key.encode())
    else:
        if blob[:1] != PLAIN:
            raise CorruptEntry("not a plain entry (an encrypted cache opened without its key?)")
        if len(blob) < 9 or blob[1:9] != _checksum(key, blob[9:]):
            raise CorruptEntry("checksum mismatch")
        payload = blob[9:]
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # any failure to deserialize means the entry is unusable
        raise CorruptEntry(f"deserialization failed: {type(exc).__name__}: {exc}") from None


class DiskTier:
    """Entries on disk under ``path`` (at most ``max_bytes``; the oldest writes are culled first).

    Culling by write age keeps a disk read read-only: diskcache's LRU policy turns every read
    into a sqlite write transaction (about 0.2 ms here). Hot keys live in the memory tier anyway.

    An entry that fails to read is deleted, counted (``integrity_failures`` for AES-GCM
    authentication failures, ``corrupt_entries`` otherwise), logged as a warning, passed to
    ``audit(event, fields)`` if given, and reported as missing. ``ttl_s`` expires entries by
    wall-clock time (diskcache uses ``time.time``).
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, encrypt_key: bytes | None = None,
                 ttl_s: float | None = None, audit: AuditHook | None = None) -> None:
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"disk_max_bytes must be a positive int, got {max_bytes!r}")
        self.path = os.fspath(path)
        self.encrypt_key = encrypt_key
        self.ttl_s = ttl_s
        self.audit = audit
        self.integrity_failures = 0
        self.corrupt_entries = 0
        self._store = diskcache.Cache(self.path, size_limit=max_bytes, eviction_policy="least-recently-stored")

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: str) -> Any:
        """The stored value of ``key``, or ``MISSING`` (absent, expired, or unreadable and dropped)."""
        blob = self._store.get(key, default=None, retry=True)
        if blob is None:
            return MISSING
        try:
            return decode_entry(key, blob, self.encrypt_key)
        except IntegrityError as exc:
            self.integrity_failures += 1
            self._drop(key, "cache.integrity_failure", str(exc))
        except CorruptEntry as exc:
            self.corrupt_entries += 1
            self._drop(key, "cache.corrupt_entry", str(exc))
        return MISSING

    def put(self, key: str, blob: bytes) -> None:
        """Store an :func:`encode_entry` blob (atomically replacing any old one)."""
        self._store.set(key, blob, expire=self.ttl_s, retry=True)

    def clear(self) -> None:
        """Delete every entry."""
        self._store.clear(retry=True)

    def close(self) -> None:
        """Close the database handles (the entries stay on disk)."""
        self._store.close()

    def _drop(self, key: str, event: str, reason: str) -> None:
        self._store.delete(key, retry=True)
        logger.warning("dropped disk cache entry %s: %s", key, reason)
        if self.audit is not None:
            self.audit(event, {"key": key, "reason": reason, "path": self.path})
