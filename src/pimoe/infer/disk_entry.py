"""The format of one disk-cache entry: a value's ``torch.save`` bytes bound to its cache key.

Entry format (``payload`` = ``torch.save`` bytes, read back with ``weights_only=True``):
  plain:     ``0x00 || xxh3_64(key || 0x00 || payload) (8 bytes) || payload``
  encrypted: ``pimoe.privacy.crypto.seal(key, payload, associated_data=cache key)``
The checksum catches accidental corruption; only the AES-GCM tag stops a deliberate change. With
the cache key as associated data, an entry copied under another key fails either check.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from pimoe.extras import extra_imports
from pimoe.infer.values import map_tensors

with extra_imports("serve", "the inference cache's disk tier"):
    import xxhash

from pimoe.privacy.crypto import open_sealed, seal  # after the extra's check: it needs it too

PLAIN = b"\x00"
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
                raise TypeError(
                    f"dict keys must be str or int for the disk tier, got {type(k).__name__}"
                )
            check_storable(item)
    elif not isinstance(value, _SCALARS):
        raise TypeError(
            f"the disk tier stores tensors, scalars, str, bytes, None and tuples/lists/dicts of them; got {type(value).__name__}"
        )


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes, so ``torch.save`` does not write a larger base storage."""
    t = t.detach()
    return (
        t
        if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes
        else t.clone(memory_format=torch.contiguous_format)
    )


def key_bytes(key: str | bytes) -> bytes:
    """The bytes a disk entry is bound to: a str key's UTF-8, a bytes key after 0xFF (a byte
    UTF-8 never holds, so ``"k"`` and ``b"k"`` never authenticate each other's entries)."""
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return b"\xff" + key
    raise TypeError(
        f"the disk tier takes str or bytes keys (see make_key), got {type(key).__name__}"
    )


def _checksum(key: str | bytes, payload: bytes) -> bytes:
    h = xxhash.xxh3_64(key_bytes(key))
    h.update(b"\x00")
    h.update(payload)
    return h.digest()


def encode_entry(key: str | bytes, value: Any, encrypt_key: bytes | None = None) -> bytes:
    """Serialize ``value`` for the disk under cache key ``key`` (sealed if ``encrypt_key``)."""
    buffer = io.BytesIO()
    torch.save(map_tensors(value, _compact), buffer)
    payload = buffer.getvalue()
    if encrypt_key is not None:
        return seal(encrypt_key, payload, associated_data=key_bytes(key))
    return PLAIN + _checksum(key, payload) + payload


def decode_entry(key: str | bytes, blob: bytes, encrypt_key: bytes | None = None) -> Any:
    """Inverse of :func:`encode_entry`; IntegrityError if a sealed entry does not authenticate,
    CorruptEntry for any other unreadable entry."""
    if encrypt_key is not None:
        payload = open_sealed(encrypt_key, blob, associated_data=key_bytes(key))
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


__all__ = [
    "PLAIN",
    "CorruptEntry",
    "check_storable",
    "decode_entry",
    "encode_entry",
    "key_bytes",
]
