"""AES-256-GCM sealing shared by checkpoints and cache entries (``cryptography``'s AESGCM).

A sealed blob is ``version (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)``. The
nonce is random per call; with a random 96-bit nonce NIST's limit is 2**32 seals per key. The
associated data is authenticated but not stored: ``open_sealed`` needs the same bytes, so a blob
moved to another context (e.g. a cache entry swapped under another key) fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import os
import string
from pathlib import Path

from pimoe.extras import extra_imports

with extra_imports("privacy", "pimoe.privacy"):
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
VERSION = 1


class IntegrityError(ValueError):
    """A sealed blob failed authentication: tampered, truncated, wrong key or wrong context."""


def generate_key() -> bytes:
    """A fresh random 32-byte AES-256 key."""
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"an AES-256 key must be {KEY_BYTES} raw bytes, got {got}")
    return bytes(key)


def _decode_key_text(text: str, source: str) -> bytes:
    text = text.strip()
    if len(text) == 2 * KEY_BYTES and all(c in string.hexdigits for c in text):
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{source}: expected a {KEY_BYTES}-byte key as {2 * KEY_BYTES} hex characters or base64"
        ) from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{source}: the key decodes to {len(key)} bytes, expected {KEY_BYTES}")
    return key


def load_key(env_var: str = "PIMOE_KEY", path: str | os.PathLike[str] | None = None) -> bytes:
    """Load a 32-byte key from the file ``path`` if given, else from the environment variable.

    A key file holds the raw 32 bytes, or the key as hex or base64 text; the variable holds hex or
    base64. Raises ValueError if the key is missing or has the wrong length or format.
    """
    if path is not None:
        data = Path(path).read_bytes()
        if len(data) == KEY_BYTES:
            return data
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(
                f"key file {path}: {len(data)} raw bytes, expected {KEY_BYTES}"
            ) from None
        return _decode_key_text(text, f"key file {path}")
    value = os.environ.get(env_var)
    if not value:
        raise ValueError(
            f"no key: set ${env_var} (hex or base64 of {KEY_BYTES} bytes) or pass a key file"
        )
    return _decode_key_text(value, f"${env_var}")


def seal(key: bytes, plaintext: bytes, associated_data: bytes = b"") -> bytes:
    """Encrypt and authenticate ``plaintext``; ``associated_data`` is authenticated, not stored."""
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(_check_key(key)).encrypt(nonce, plaintext, associated_data)
    return bytes([VERSION]) + nonce + ciphertext


def open_sealed(key: bytes, blob: bytes, associated_data: bytes = b"") -> bytes:
    """Return the plaintext of a :func:`seal` blob; raise IntegrityError if it does not authenticate."""
    aesgcm = AESGCM(_check_key(key))
    if len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
        raise IntegrityError(
            f"sealed blob truncated: {len(blob)} bytes, at least {1 + NONCE_BYTES + TAG_BYTES} expected"
        )
    if blob[0] != VERSION:
        raise IntegrityError(f"unknown sealed-blob version {blob[0]} (expected {VERSION})")
    nonce, ciphertext = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
    try:
        return aesgcm.decrypt(nonce, ciphertext, associated_data)
    except InvalidTag:
        raise IntegrityError(
            "sealed blob failed authentication: tampered or truncated data, wrong key, or wrong associated data"
        ) from None
