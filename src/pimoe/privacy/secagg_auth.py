"""SecAgg+'s advertised keys: a commitment to the self-mask seed and an optional signature.

Stage 1 of a SecAgg+ round (:meth:`pimoe.privacy.secaggplus.SecAggPlusClient.advertise`) sends an
:class:`Advertisement`: the client's two X25519 public keys, a commitment to its self-mask seed
``b_u`` and, for a client holding a long-term Ed25519 signing key, a signature over all three
with the round and the client id (Bonawitz et al. 2017, actively secure variant).

- The commitment ``SHA-256(tag | round | client | b_u)`` hides ``b_u`` (32 uniform bytes) and
  binds the client to it: the server checks every rebuilt ``b_u`` against it
  (:func:`seed_commitment`), so a wrong share is detected with exactly the threshold of shares.
- Given a trusted registry ``{client id: Ed25519 public key}`` (distributed out of band: the
  PKI), a client refuses advertised keys that are unsigned, signed by another key or for another
  round or client id, or from a client not in the registry (:func:`verify_advertisements`): the
  relaying server can neither replace a client's keys nor add clients of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import NamedTuple

from pimoe.extras import extra_imports
from pimoe.privacy.masking import PUBLIC_KEY_BYTES, SEED_BYTES, check_distinct_keys, check_ids

with extra_imports("privacy", "pimoe.privacy.secagg_auth"):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

COMMIT_TAG = "pimoe-secagg+-commit-v1"
SIGN_TAG = "pimoe-secagg+-keys-v1"
SIGNATURE_BYTES = 64


class Advertisement(NamedTuple):
    """A client's stage-1 message, relayed by the server to every client of the round.

    ``c_pk`` / ``s_pk``: the share-channel and mask X25519 public keys (32 raw bytes each);
    ``commitment``: :func:`seed_commitment` of the self-mask seed; ``signature``: 64-byte Ed25519
    signature of :func:`signed_message`, or None for an unsigned client (no registry).
    """

    c_pk: bytes
    s_pk: bytes
    commitment: bytes
    signature: bytes | None = None


def seed_commitment(seed: bytes, client_id: int, round_id: int) -> bytes:
    """``SHA-256(tag | round | client | seed)``: 32 bytes binding ``client_id`` to its self-mask seed."""
    prefix = f"{COMMIT_TAG}|round={int(round_id)}|client={int(client_id)}|".encode()
    return hashlib.sha256(prefix + seed).digest()


def signed_message(ad: Advertisement, client_id: int, round_id: int) -> bytes:
    """The bytes a client signs: tag, round and client id, then its keys and commitment (fixed sizes)."""
    prefix = f"{SIGN_TAG}|round={int(round_id)}|client={int(client_id)}|".encode()
    return prefix + ad.c_pk + ad.s_pk + ad.commitment


def make_advertisement(
    keys: tuple[bytes, bytes],
    seed: bytes,
    client_id: int,
    round_id: int,
    signing_key: Ed25519PrivateKey | None,
) -> Advertisement:
    """The :class:`Advertisement` of ``keys`` ``(c_pk, s_pk)`` and ``seed``, signed with ``signing_key`` if given."""
    ad = Advertisement(*keys, seed_commitment(seed, client_id, round_id))
    if signing_key is None:
        return ad
    return ad._replace(signature=signing_key.sign(signed_message(ad, client_id, round_id)))


def check_advertisements(keys: Mapping[int, object]) -> dict[int, Advertisement]:
    """``keys`` (client id -> advertisement) as :class:`Advertisement` s; ``TypeError`` on
    non-integer ids, ``ValueError`` naming the client for one that is not ``(c_pk, s_pk,
    commitment[, signature])`` of the right sizes, or two clients with one public key."""
    out = {}
    for j, ad in zip(check_ids(keys), keys.values()):
        if not isinstance(ad, tuple) or len(ad) not in (3, 4):
            raise ValueError(
                f"client {j}'s advertised keys must be (c_pk, s_pk, commitment[, signature])"
            )
        ad = Advertisement(*ad)
        sizes = {"c_pk": PUBLIC_KEY_BYTES, "s_pk": PUBLIC_KEY_BYTES, "commitment": SEED_BYTES}
        if ad.signature is not None:
            sizes["signature"] = SIGNATURE_BYTES
        for field, size in sizes.items():
            value = getattr(ad, field)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"client {j}'s advertised {field} must be {size} raw bytes")
        out[j] = ad
    check_distinct_keys({j: (ad.c_pk, ad.s_pk) for j, ad in out.items()})
    return out


def verify_advertisements(
    keys: Mapping[int, Advertisement], registry: Mapping[int, bytes], round_id: int
) -> None:
    """``ValueError`` naming the first client whose advertisement is not signed for ``round_id`` by
    its key in ``registry`` (client id -> 32-byte raw Ed25519 public key), or that is not in it."""
    check_ids(registry, "registry ids")
    for j, ad in keys.items():
        if j not in registry:
            raise ValueError(
                f"client {j} is not in the key registry (a client the server added?); refusing the round"
            )
        if ad.signature is None:
            raise ValueError(
                f"client {j}'s advertised keys are not signed, and a registry is given"
            )
        raw = registry[j]
        if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(
                f"the registry's key of client {j} must be {PUBLIC_KEY_BYTES} raw Ed25519 bytes"
            )
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(
                ad.signature, signed_message(ad, j, round_id)
            )
        except InvalidSignature:
            raise ValueError(
                f"client {j}'s advertised keys do not carry its registered signature for round "
                f"{round_id} (keys replaced or replayed by the relay?)"
            ) from None
