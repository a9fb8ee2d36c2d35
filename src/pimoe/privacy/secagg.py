"""Secure aggregation: pairwise masking (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020).

Every client holds an X25519 key pair. For each pair of clients ``i < j`` the Diffie-Hellman
secret, passed through HKDF-SHA256 with the round number, gives a 32-byte seed ``s_ij`` that only
``i`` and ``j`` can compute; AES-256-CTR expands it into a mask vector ``m_ij`` of uniform 64-bit
integers. Client ``i`` sends

    y_i = encode(x_i) + sum_{j > i} m_ij - sum_{j < i} m_ji   (mod 2**64)

where ``encode`` is fixed point with ``frac_bits`` fractional bits. In the sum over all clients
every mask appears once with each sign, so the server gets ``sum_i encode(x_i)`` exactly.

``SecAggClient`` / ``unmask_sum``: the single-mask variant. Survivors reveal the pair seeds they
shared with dropped clients, so a server that lies about who dropped can unmask a live client's
update: use it only with an honest-but-curious server (it is kept as the cheapest baseline).

``SecAggPlusClient`` / ``secaggplus_sum`` (what ``pimoe.federated`` uses): every client also adds
a self-mask ``PRG(b_u)`` and Shamir-shares ``b_u`` and its mask private key among the round's
clients (threshold ``t``, a strict majority); for each client the server asks for EITHER the
``b_u`` shares (survivor: remove the self-mask) OR the key shares (dropped: rebuild its pair
masks), and each client answers once per round with one kind per client. A lying server gets
at most one of the two secrets of any client. Stage 1 advertises the keys with a commitment
``SHA-256(tag | round | client | b_u)`` (:mod:`pimoe.privacy.secagg_auth`): the server checks
every rebuilt ``b_u`` against it and every rebuilt mask key against its public key, so a wrong
share from a malicious client is detected, with exactly ``t`` shares too; the round is refused
naming the client whose secret failed (not the sender of the wrong share) and is lost. Given a
trusted registry of the clients' long-term Ed25519 keys, clients refuse advertised keys that are
not signed for the round by the registered key, or that come from a client not in the registry,
so the relay can neither replace keys nor add clients of its own. Without a registry (the
default, and ``pimoe.federated``'s) the relayed keys are trusted: an honest-but-curious server
only. Not covered: a server colluding with clients (each may reveal both kinds of shares: with
``c`` colluders it rebuilds both secrets of an honest survivor once ``2t <= n + c``, so one
colluder suffices for an odd ``n`` with the strict-majority threshold; clients given
``share(..., colluders=c)`` refuse any ``2t <= n + c``, by default they accept any strict majority; Bonawitz et al.'s signed consistency round
is not implemented and would not help: each of the server's two survivor sets is signed by its
honest half and the colluders, ``t`` clients, exactly when ``2t <= n + c``); the protocol runs on the complete graph (SecAgg+'s sparse k-regular graph is not implemented); masked inputs
cannot be screened (see pimoe.federated.bounding); the sum itself is not private (add DP).
Masks depend on the round number and fresh keys are made every round.

The encoding and masks are in :mod:`pimoe.privacy.masking`, SecAgg+ in
:mod:`pimoe.privacy.secaggplus`; this module holds the single-mask variant and re-exports both.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np

from pimoe.extras import extra_imports
from pimoe.privacy.masking import (
    FRAC_BITS,
    MODULUS_BITS,
    PUBLIC_KEY_BYTES,
    SEED_BYTES,
    apply_pair_masks,
    check_distinct_keys,
    check_ids,
    check_masked,
    check_seed,
    decode,
    encode,
    mask_vector,
    pair_seed,
)
from pimoe.privacy.secagg_auth import Advertisement
from pimoe.privacy.secaggplus import SecAggPlusClient, secaggplus_sum

with extra_imports("privacy", "pimoe.privacy.secagg"):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat


class SecAggClient:
    """One client of a secure-aggregation round.

    Args:
        client_id: this client's id; ids order the pairs (the lower id adds the pair mask).
        frac_bits: fixed-point fractional bits (precision ``2**-frac_bits``); the same for all.
        private_key: a 32-byte X25519 private key from :meth:`private_key_bytes` (a stateless
            client restoring itself between messages of one round); a fresh key if None.
    """

    def __init__(
        self, client_id: int, frac_bits: int = FRAC_BITS, private_key: bytes | None = None
    ) -> None:
        if not 0 <= frac_bits < MODULUS_BITS - 1:
            raise ValueError(f"frac_bits must be in [0, {MODULUS_BITS - 2}], got {frac_bits}")
        if private_key is not None and (
            not isinstance(private_key, bytes) or len(private_key) != 32
        ):
            raise ValueError("private_key must be 32 raw bytes (from private_key_bytes())")
        self.client_id = int(client_id)
        self.frac_bits = frac_bits
        self._key = (
            X25519PrivateKey.from_private_bytes(private_key)
            if private_key
            else X25519PrivateKey.generate()
        )
        self._seeds: dict[int, bytes] = {}

    def private_key_bytes(self) -> bytes:
        """The raw X25519 private key, for a client that must keep it in its own state between messages."""
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def public_key(self) -> bytes:
        """The 32-byte X25519 public key to send to the server, which relays it to the peers."""
        return self._key.public_key().public_bytes_raw()

    def pair_seed(self, peer_id: int, peer_key: bytes, round_id: int) -> bytes:
        """The seed this client shares with ``peer_id`` for ``round_id`` (the peer derives the same)."""
        return pair_seed(self._key, self.client_id, peer_id, peer_key, round_id)

    def mask(self, update: np.ndarray, peers: dict[int, bytes], round_id: int = 0) -> np.ndarray:
        """Masked fixed-point encoding ``uint64 [D]`` of ``update [D]`` (float, 1-D).

        ``peers`` maps every other client of the round (this one may be included) to its public
        key; all clients must get the same set. Use a fresh ``round_id`` per round.
        """
        check_ids(peers)
        others = {int(j): key for j, key in peers.items() if int(j) != self.client_id}
        if not others:
            raise ValueError("secure aggregation needs at least one peer")
        check_distinct_keys(
            {j: [k] for j, k in {**others, self.client_id: self.public_key()}.items()}
        )
        masked = encode(update, self.frac_bits, max_terms=len(others) + 1)
        self._seeds = {j: self.pair_seed(j, key, round_id) for j, key in others.items()}
        return apply_pair_masks(masked, self.client_id, self._seeds)

    def reveal_seeds_for(self, dropped_ids: Iterable[int]) -> dict[int, bytes]:
        """The seeds of the last :meth:`mask` call shared with the clients that dropped, by their id."""
        dropped = {int(j) for j in dropped_ids}
        if self.client_id in dropped:
            raise ValueError(
                f"client {self.client_id} is alive; it reveals seeds only for dropped peers"
            )
        unknown = dropped - set(self._seeds)
        if unknown:
            raise ValueError(
                f"clients {sorted(unknown)} were not peers of client {self.client_id} in its last round"
            )
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
    Raises ``ValueError`` naming the client on a malformed masked input (not a
    non-empty 1-D uint64 array of the common length) or revealed seed (not ``SEED_BYTES`` bytes),
    unknown clients or missing/extra seeds; ``TypeError`` on non-integer ids.
    """
    length = check_masked(masked)
    survivors, everyone = set(check_ids(masked)), set(check_ids(participants))
    if not survivors <= everyone:
        raise ValueError(
            f"inputs from clients {sorted(survivors - everyone)} that were not participants"
        )
    dropped = everyone - survivors
    revealed = revealed or {}
    total = np.zeros(length, dtype=np.uint64)
    for vector in masked.values():
        total += vector
    for i in survivors:
        seeds = revealed.get(i, {})
        if set(seeds) != dropped:
            raise ValueError(
                f"client {i} revealed seeds for {sorted(seeds)}, but the dropped clients are {sorted(dropped)}"
            )
        seeds = {j: check_seed(seed, i, j) for j, seed in seeds.items()}
        total = apply_pair_masks(total, i, seeds, sign=-1)  # undo what client i applied
    return decode(total, frac_bits)


__all__ = [
    "FRAC_BITS",
    "MODULUS_BITS",
    "PUBLIC_KEY_BYTES",
    "SEED_BYTES",
    "Advertisement",
    "SecAggClient",
    "SecAggPlusClient",
    "apply_pair_masks",
    "decode",
    "encode",
    "mask_vector",
    "pair_seed",
    "secaggplus_sum",
    "unmask_sum",
]
