"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, single-mask variant).

Every client holds an X25519 key pair. For each pair of clients ``i < j`` the Diffie-Hellman
secret, passed through HKDF-SHA256 with the round number, gives a 32-byte seed ``s_ij`` that only
``i`` and ``j`` can compute; AES-256-CTR expands it into a mask vector ``m_ij`` of uniform 64-bit
integers. Client ``i`` sends

    y_i = encode(x_i) + sum_{j > i} m_ij - sum_{j < i} m_ji   (mod 2**64)

where ``encode`` is fixed point with ``frac_bits`` fractional bits. In the sum over all clients
every mask appears once with each sign, so the server gets ``sum_i encode(x_i)`` exactly (mod
2**64) and decodes it; the error is only the rounding of each value to ``2**-frac_bits``.

A client that drops after the others masked leaves its pair masks uncancelled in the survivors'
inputs: each survivor reveals the seed it shared with the dropped client
(:meth:`SecAggClient.reveal_seeds_for`) and :func:`unmask_sum` regenerates and removes those masks.

Threat model covered: an honest-but-curious server (follows the protocol, reads everything it
receives) and eavesdroppers see each masked input ``y_i`` as uniform noise; only the sum is
revealed. Not covered (the parts of Bonawitz et al. this variant leaves out):
- no self-mask and no secret sharing: a server that lies about who dropped can obtain a live
  client's pair seeds and unmask its update (``unmask_sum`` refuses seeds for a client whose input
  it holds, but a malicious server would not call it); a client that drops before revealing the
  seeds for another dropped client makes the round unrecoverable;
- no authentication of public keys (the server relays them: it could run a man-in-the-middle),
  no protection against a client sending a malformed or poisoned input (masked inputs cannot be
  screened; use DP or norm-bounded updates), and no protection of the sum itself (use DP for that).
Masks depend on the round number: reusing a round number with the same keys reuses the masks, and
the difference of two masked inputs then leaks the difference of the updates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

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
        got = f"{update.dtype} array of shape {update.shape}" if isinstance(update, np.ndarray) else type(update).__name__
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


def _public_key(raw: bytes, owner: int) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"client {owner}'s public key must be {PUBLIC_KEY_BYTES} raw bytes")
    return X25519PublicKey.from_public_bytes(raw)


class SecAggClient:
    """One client of a secure-aggregation round.

    Args:
        client_id: this client's id; ids order the pairs (the lower id adds the pair mask).
        frac_bits: fixed-point fractional bits (precision ``2**-frac_bits``); the same for all.
        private_key: a 32-byte X25519 private key from :meth:`private_key_bytes` (a stateless
            client restoring itself between messages of one round); a fresh key if None.
    """

    def __init__(self, client_id: int, frac_bits: int = FRAC_BITS, private_key: bytes | None = None) -> None:
        if not 0 <= frac_bits < MODULUS_BITS - 1:
            raise ValueError(f"frac_bits must be in [0, {MODULUS_BITS - 2}], got {frac_bits}")
        if private_key is not None and (not isinstance(private_key, bytes) or len(private_key) != 32):
            raise ValueError("private_key must be 32 raw bytes (from private_key_bytes())")
        self.client_id = int(client_id)
        self.frac_bits = frac_bits
        self._key = X25519PrivateKey.from_private_bytes(private_key) if private_key else X25519PrivateKey.generate()
        self._seeds: dict[int, bytes] = {}

    def private_key_bytes(self) -> bytes:
        """The raw X25519 private key, for a client that must keep it in its own state between messages."""
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def public_key(self) -> bytes:
        """The 32-byte X25519 public key to send to the server, which relays it to the peers."""
        return self._key.public_key().public_bytes_raw()

    def pair_seed(self, peer_id: int, peer_key: bytes, round_id: int) -> bytes:
        """The seed this client shares with ``peer_id`` for ``round_id`` (the peer derives the same)."""
        shared = self._key.exchange(_public_key(peer_key, peer_id))
        low, high = sorted((self.client_id, int(peer_id)))
        info = f"pimoe-secagg-v1|round={round_id}|pair={low},{high}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)

    def mask(self, update: np.ndarray, peers: dict[int, bytes], round_id: int = 0) -> np.ndarray:
        """Masked fixed-point encoding ``uint64 [D]`` of ``update [D]`` (float, 1-D).

        ``peers`` maps every other client of the round (this one may be included) to its public
        key; all clients must get the same set. Use a fresh ``round_id`` per round.
        """
        others = {int(j): key for j, key in peers.items() if int(j) != self.client_id}
        if not others:
            raise ValueError("secure aggregation needs at least one peer")
        masked = encode(update, self.frac_bits, max_terms=len(others) + 1)
        self._seeds = {j: self.pair_seed(j, key, round_id) for j, key in others.items()}
        for j, seed in self._seeds.items():
            pair_mask = mask_vector(seed, masked.size)
            masked = masked + pair_mask if self.client_id < j else masked - pair_mask
        return masked

    def reveal_seeds_for(self, dropped_ids: Iterable[int]) -> dict[int, bytes]:
        """The seeds of the last :meth:`mask` call shared with the clients that dropped, by their id."""
        dropped = {int(j) for j in dropped_ids}
        if self.client_id in dropped:
            raise ValueError(f"client {self.client_id} is alive; it reveals seeds only for dropped peers")
        unknown = dropped - set(self._seeds)
        if unknown:
            raise ValueError(f"clients {sorted(unknown)} were not peers of client {self.client_id} in its last round")
        return {j: self._seeds[j] for j in sorted(dropped)}


def unmask_sum(
    masked: dict[int, np.ndarray],
    participants: Collection[int],
    revealed: dict[int, dict[int, bytes]] | None = None,
    frac_bits: int = FRAC_BITS,
) -> np.ndarray:
    """Server side: the sum ``float64 [D]`` of the surviving clients' updates.

    Args:
        masked: masked inputs ``uint64 [D]`` by client id (the survivors).
        participants: every client that was given the peer list this round (survivors and dropped).
        revealed: for a round with dropped clients, each survivor's :meth:`SecAggClient.reveal_seeds_for`
            answer, by survivor id; every survivor must reveal a seed for every dropped client.

    Divide by ``len(masked)`` for the mean (or let clients pre-multiply by their weight).
    Raises ValueError on inconsistent shapes, unknown clients or missing/extra seeds.
    """
    if not masked:
        raise ValueError("no masked inputs to aggregate")
    survivors, everyone = set(masked), set(participants)
    if not survivors <= everyone:
        raise ValueError(f"inputs from clients {sorted(survivors - everyone)} that were not participants")
    dropped = everyone - survivors
    revealed = revealed or {}
    shapes = {v.shape for v in masked.values()}
    if len(shapes) != 1 or any(v.dtype != np.uint64 or v.ndim != 1 for v in masked.values()):
        raise ValueError(f"masked inputs must be 1-D uint64 arrays of one length, got shapes {sorted(shapes)}")
    total = np.zeros(shapes.pop(), dtype=np.uint64)
    for vector in masked.values():
        total += vector
    for i in survivors:
        seeds = revealed.get(i, {})
        if set(seeds) != dropped:
            raise ValueError(
                f"client {i} revealed seeds for {sorted(seeds)}, but the dropped clients are {sorted(dropped)}"
            )
        for j, seed in seeds.items():
            pair_mask = mask_vector(seed, total.size)
            total = total - pair_mask if i < j else total + pair_mask  # undo what client i applied
    return decode(total, frac_bits)
