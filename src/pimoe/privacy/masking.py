"""Fixed-point encoding and pairwise masks, the building blocks of secure aggregation.

Every client holds an X25519 key pair. For each pair of clients ``i < j`` the Diffie-Hellman
secret, passed through HKDF-SHA256 with the round number, gives a 32-byte seed ``s_ij`` that only
``i`` and ``j`` can compute (:func:`pair_seed`); AES-256-CTR expands it into a mask vector ``m_ij``
of uniform 64-bit integers (:func:`mask_vector`). :func:`apply_pair_masks` adds ``+m_ij`` toward
higher ids and ``-m_ji`` toward lower ones, so the masks cancel in the sum over all clients.
:func:`encode` / :func:`decode` map float updates to fixed point mod 2**64 and back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from pimoe.extras import extra_imports

with extra_imports("privacy", "pimoe.privacy.masking"):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRAC_BITS = 24
MODULUS_BITS = 64
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32


def encode(update: np.ndarray, frac_bits: int = FRAC_BITS, max_terms: int = 1) -> np.ndarray:
    """Fixed-point encoding of ``update [D]`` into ``uint64 [D]`` (two's complement, mod 2**64).

    Raises ValueError for a non-1-D, non-float, empty or non-finite input, or values so large that
    a sum of ``max_terms`` of them would overflow the signed 64-bit range.
    """
    if not isinstance(update, np.ndarray) or update.ndim != 1 or update.dtype.kind != "f":
        got = (
            f"{update.dtype} array of shape {update.shape}"
            if isinstance(update, np.ndarray)
            else type(update).__name__
        )
        raise TypeError(f"an update must be a 1-D float numpy array, got {got}")
    if update.size == 0:
        raise ValueError("an update must not be empty")
    if not np.isfinite(update).all():
        raise ValueError("an update holds NaN or inf")
    limit = 2.0 ** (MODULUS_BITS - 1 - frac_bits) / max_terms
    if np.abs(update).max() >= limit:
        raise ValueError(
            f"update values up to {np.abs(update).max():.3g} overflow the fixed-point range: the sum of "
            f"{max_terms} inputs with {frac_bits} fractional bits must stay below {limit * max_terms:.3g}"
        )
    return np.round(update.astype(np.float64) * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def decode(encoded: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Inverse of :func:`encode` (also for a sum of encodings): ``uint64 [D]`` -> ``float64 [D]``."""
    return encoded.view(np.int64).astype(np.float64) / 2.0**frac_bits


def mask_vector(seed: bytes, length: int) -> np.ndarray:
    """``uint64 [length]`` uniform integers: the AES-256-CTR keystream of ``seed`` (a CSPRNG)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype=np.uint64)


def check_ids(ids: Iterable[object], what: str = "client ids") -> list[int]:
    """``ids`` as a list, each a Python or NumPy integer (not a bool, float or string, which
    ``int()`` would silently merge with another id); ``TypeError`` otherwise."""
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{what} must be integers, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    return out


def check_distinct_keys(keys: Mapping[int, Iterable[bytes]]) -> None:
    """``ValueError`` when two clients hold one public key: a relay replaying client ``i``'s key
    as client ``j``'s would let ``i`` compute every secret ``j`` shares."""
    owner: dict[bytes, int] = {}
    for j, held in keys.items():
        for key in held:
            if key in owner and owner[key] != j:
                raise ValueError(
                    f"clients {owner[key]} and {j} sent the same public key (a replayed key)"
                )
            owner[key] = j


def check_seed(seed: object, owner: int, about: int) -> bytes:
    """``seed``, a revealed or rebuilt secret ``owner`` gave about client ``about``, if it is
    ``SEED_BYTES`` raw bytes; ``ValueError`` naming both otherwise (AES would take a 16- or
    24-byte key as AES-128/192 and give a wrong mask, silently). A client's bad answer is a bad
    value, whatever its type, so the server can refuse the round with one ``except``."""
    if not isinstance(seed, bytes):
        raise ValueError(
            f"client {owner} sent a {type(seed).__name__} for client {about}, not {SEED_BYTES} bytes"
        )
    if len(seed) != SEED_BYTES:
        raise ValueError(
            f"client {owner} sent {len(seed)} bytes for client {about}, not {SEED_BYTES}"
        )
    return seed


def check_masked(masked: Mapping[int, object]) -> int:
    """The common length of the masked inputs (each a non-empty 1-D ``uint64`` array); a
    ``ValueError`` naming the first client at fault (as :func:`check_seed`, whatever the type)."""
    length = None
    for i, v in masked.items():
        if not isinstance(v, np.ndarray) or v.dtype != np.uint64:
            got = v.dtype if isinstance(v, np.ndarray) else type(v).__name__
            raise ValueError(f"client {i}'s masked input must be a uint64 numpy array, got {got}")
        if v.ndim != 1 or not v.size:
            raise ValueError(
                f"client {i}'s masked input must be non-empty and 1-D, got shape {v.shape}"
            )
        if length is not None and v.size != length:
            raise ValueError(
                f"masked inputs must be of one length: client {i} sent {v.size}, others {length}"
            )
        length = v.size
    if length is None:
        raise ValueError("no masked inputs to aggregate")
    return length


def public_key_from(raw: bytes, owner: int) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"client {owner}'s public key must be {PUBLIC_KEY_BYTES} raw bytes")
    return X25519PublicKey.from_public_bytes(raw)


def derive_seed(secret: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=label.encode()
    ).derive(secret)


def pair_seed(
    key: X25519PrivateKey, own_id: int, peer_id: int, peer_key: bytes, round_id: int
) -> bytes:
    """The 32-byte seed ``own_id`` (holding ``key``) shares with ``peer_id`` in ``round_id``: X25519 + HKDF-SHA256."""
    low, high = sorted((int(own_id), int(peer_id)))
    return derive_seed(
        key.exchange(public_key_from(peer_key, peer_id)),
        f"pimoe-secagg-v1|round={round_id}|pair={low},{high}",
    )


def apply_pair_masks(
    vector: np.ndarray, own_id: int, seeds: dict[int, bytes], sign: int = 1
) -> np.ndarray:
    """``vector`` plus (``sign=-1``: minus) ``own_id``'s pair masks: ``+m`` toward higher ids, ``-m`` toward lower."""
    for j, seed in seeds.items():
        pair_mask = mask_vector(seed, vector.size)
        vector = vector + pair_mask if (own_id < j) == (sign > 0) else vector - pair_mask
    return vector
