"""SecAgg+ (Bell et al. 2020): pairwise masks plus self-masks with Shamir-shared recovery.

Every client adds a self-mask ``PRG(b_u)`` to its pairwise-masked input and Shamir-shares ``b_u``
and its mask private key among the round's clients (threshold ``t``, a strict majority); for each
client the server asks for EITHER the ``b_u`` shares (survivor: remove the self-mask) OR the key
shares (dropped: rebuild its pair masks), and each client answers once per round with one kind
per client. Stage 1's keys come with a commitment to ``b_u`` and, optionally, a signature
(:mod:`pimoe.privacy.secagg_auth`). The threat model is in :mod:`pimoe.privacy.secagg`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from pimoe.extras import extra_imports
from pimoe.privacy.masking import (
    FRAC_BITS,
    SEED_BYTES,
    apply_pair_masks,
    check_ids,
    check_masked,
    check_seed,
    decode,
    derive_seed,
    encode,
    mask_vector,
    pair_seed,
    public_key_from,
)
from pimoe.privacy.secagg_auth import (
    Advertisement,
    check_advertisements,
    make_advertisement,
    seed_commitment,
    verify_advertisements,
)

with extra_imports("privacy", "pimoe.privacy.secaggplus"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

SHARE_INFO = "pimoe-secagg+-v1"


def _shamir_split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares (GF(2^128), pycryptodome) of a 32-byte secret; share k has index k + 1."""
    from Crypto.Protocol.SecretSharing import Shamir

    parts = [
        Shamir.split(threshold, count, secret[i : i + 16], ssss=False)
        for i in range(0, len(secret), 16)
    ]
    return [b"".join(part[k][1] for part in parts) for k in range(count)]


def _shamir_combine(shares: dict[int, bytes]) -> bytes:
    """The secret from shares by index (any ``threshold`` of them; fewer give a wrong value, silently)."""
    from Crypto.Protocol.SecretSharing import Shamir

    size = len(next(iter(shares.values())))
    return b"".join(
        Shamir.combine([(i, s[c : c + 16]) for i, s in shares.items()], ssss=False)
        for c in range(0, size, 16)
    )


def _share_cipher(
    key: X25519PrivateKey, peer_key: bytes, sender: int, receiver: int, round_id: int
) -> tuple[Any, bytes]:
    """AES-GCM for the share ``sender -> receiver`` (X25519 of the channel keys + HKDF) and its associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    label = f"{SHARE_INFO}|round={round_id}|{sender}->{receiver}"
    return AESGCM(
        derive_seed(key.exchange(public_key_from(peer_key, sender)), label)
    ), label.encode()


def _read_state(state: bytes) -> dict[str, Any]:
    """:meth:`SecAggPlusClient.state` parsed and checked (keys as bytes); ``ValueError`` naming
    the field of a malformed or crafted state."""

    def raw(value: object, field: str) -> bytes:
        if not isinstance(value, str) or len(value) != 2 * SEED_BYTES:
            raise ValueError(f"saved SecAgg+ state: {field} must be {SEED_BYTES} hex bytes")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"saved SecAgg+ state: {field} is not hex") from None

    try:
        saved = json.loads(state)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"saved SecAgg+ state is not JSON: {err}") from None
    fields = {"client", "round", "c", "s", "b", "keys", "threshold", "sharers", "unmasked"}
    if not isinstance(saved, dict) or set(saved) != fields:
        raise ValueError(f"saved SecAgg+ state must be an object with the fields {sorted(fields)}")
    for field in ("client", "round", "threshold"):
        if type(saved[field]) is not int:
            raise ValueError(f"saved SecAgg+ state: {field} must be an integer")
    if not isinstance(saved["sharers"], list) or any(type(j) is not int for j in saved["sharers"]):
        raise ValueError("saved SecAgg+ state: sharers must be a list of integers")
    if type(saved["unmasked"]) is not bool:
        raise ValueError("saved SecAgg+ state: unmasked must be true or false")
    keys = saved["keys"]
    if not isinstance(keys, dict) or any(
        not j.lstrip("-").isdigit() or not isinstance(pair, list) or len(pair) != 2
        for j, pair in keys.items()
    ):
        raise ValueError("saved SecAgg+ state: keys must map client ids to two hex keys")
    return {
        **saved,
        **{k: raw(saved[k], k) for k in ("c", "s", "b")},
        "keys": {int(j): (raw(c, "keys"), raw(s, "keys")) for j, (c, s) in keys.items()},
    }


class SecAggPlusClient:
    """One client in one round of SecAgg+ secure aggregation (complete graph of the round's clients).

    Stages (the server relays every message):

    1. :meth:`advertise` -> ``(c_pk, s_pk, commitment, signature)``: X25519 keys for the share
       channel and the masks, a commitment to the self-mask seed ``b_u``, and (given a long-term
       Ed25519 signing key) a signature over them.
    2. :meth:`share` (all clients' advertisements, threshold ``t``, optionally a registry of
       signing keys to check them against): Shamir-shares ``b_u`` and the mask private key
       ``s_sk`` among the clients, one AES-GCM ciphertext per recipient.
    3. :meth:`mask` (the clients whose shares went out): ``y_u = encode(x_u) + PRG(b_u) + pair masks``.
    4. :meth:`unmask` (survivors, dropped, this client's inbox of shares): for each other client
       EITHER its ``b`` share (a survivor) OR its ``s_sk`` share (dropped), never both, once per round.

    The server needs ``t`` shares to rebuild a secret. With ``t`` a strict majority of the round's
    clients, a server that calls one client "dropped" to some clients and a "survivor" to others
    gets at most one of its two secrets, so its masked input stays hidden behind either the
    self-mask or the pair masks.
    """

    def __init__(
        self, client_id: int, round_id: int, frac_bits: int = FRAC_BITS, state: bytes | None = None
    ) -> None:
        self.client_id, self.round_id, self.frac_bits = int(client_id), int(round_id), frac_bits
        if state is None:
            self._c, self._s, self._b = (
                X25519PrivateKey.generate(),
                X25519PrivateKey.generate(),
                os.urandom(SEED_BYTES),
            )
            self._keys: dict[int, tuple[bytes, bytes]] = {}
            self._sharers: list[int] = []
            self._threshold, self._unmasked = 0, False
            return
        saved = _read_state(state)
        if saved["client"] != self.client_id or saved["round"] != self.round_id:
            raise ValueError(
                f"saved SecAgg+ state of client {saved['client']} round {saved['round']}, not "
                f"client {self.client_id} round {self.round_id}"
            )
        self._c, self._s = (X25519PrivateKey.from_private_bytes(saved[k]) for k in ("c", "s"))
        self._b, self._keys = saved["b"], saved["keys"]
        self._threshold, self._sharers, self._unmasked = (
            saved["threshold"],
            saved["sharers"],
            saved["unmasked"],
        )

    def state(self) -> bytes:
        """Everything this client must keep between the stages of its round (secret: keep it local)."""
        raw = lambda k: k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()  # noqa: E731
        return json.dumps(
            {
                "client": self.client_id,
                "round": self.round_id,
                "c": raw(self._c),
                "s": raw(self._s),
                "b": self._b.hex(),
                "keys": {str(j): (c.hex(), s.hex()) for j, (c, s) in self._keys.items()},
                "threshold": self._threshold,
                "sharers": self._sharers,
                "unmasked": self._unmasked,
            }
        ).encode()

    def public_keys(self) -> tuple[bytes, bytes]:
        """``(c_pk, s_pk)``: the share-channel key and the mask key, 32 raw bytes each."""
        return self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw()

    def advertise(self, signing_key: Ed25519PrivateKey | None = None) -> Advertisement:
        """Stage 1's message: :meth:`public_keys`, the commitment to ``b_u``, and a signature by
        ``signing_key`` (this client's long-term Ed25519 key, registered with its peers) if given."""
        return make_advertisement(
            self.public_keys(), self._b, self.client_id, self.round_id, signing_key
        )

    def share(
        self,
        keys: Mapping[int, Advertisement],
        threshold: int,
        registry: Mapping[int, bytes] | None = None,
        colluders: int = 0,
    ) -> dict[int, bytes]:
        """Encrypted shares of ``b_u`` and ``s_sk`` for every client in ``keys`` (id -> its :meth:`advertise`), by recipient.

        Refuses a threshold ``t`` with ``2t <= n + colluders`` for the ``n`` clients of ``keys``
        (a server with that many corrupt clients could rebuild both secrets of an honest one;
        ``colluders=0``: a strict majority) or keys that do not list this client's own. Given ``registry``
        (client id -> raw Ed25519 public key, trusted), refuses any advertisement that is not
        signed for this round by its client's registered key, or from a client not in it.
        Without one, the keys are taken as relayed: an honest-but-curious server only.
        """
        keys = check_advertisements(keys)
        if registry is not None:
            verify_advertisements(keys, registry, self.round_id)
        own = keys.get(self.client_id)
        if own is None or own[:3] != self.advertise()[:3]:
            raise ValueError(f"the key list does not hold client {self.client_id}'s own keys")
        if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0:
            raise ValueError(f"colluders must be an int >= 0, got {colluders!r}")
        if not (len(keys) + colluders < 2 * threshold <= 2 * len(keys) and threshold >= 2):
            raise ValueError(
                f"threshold {threshold} must be >= 2, at most the {len(keys)} clients and a strict "
                f"majority of them plus {colluders} colluders (2t > n + c)"
            )
        self._keys = {j: (ad.c_pk, ad.s_pk) for j, ad in keys.items()}
        self._threshold = int(threshold)
        order = sorted(keys)
        b_shares = _shamir_split(self._b, threshold, len(order))
        s_shares = _shamir_split(
            self._s.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            threshold,
            len(order),
        )
        out = {}
        for k, j in enumerate(order):
            cipher, label = _share_cipher(self._c, keys[j].c_pk, self.client_id, j, self.round_id)
            nonce = os.urandom(12)
            out[j] = nonce + cipher.encrypt(nonce, b_shares[k] + s_shares[k], label)
        return out

    def mask(self, update: np.ndarray, sharers: Collection[int]) -> np.ndarray:
        """``uint64 [D]``: ``encode(update) + PRG(b_u) + pair masks`` toward every other client in ``sharers``."""
        sharers = sorted({int(j) for j in sharers})
        if not self._keys:
            raise ValueError("share() must come before mask()")
        if (
            self.client_id not in sharers
            or not set(sharers) <= set(self._keys)
            or len(sharers) < self._threshold
        ):
            raise ValueError(
                f"the clients to mask with must include this one, be among the {len(self._keys)} that "
                f"exchanged keys and number at least the threshold {self._threshold}"
            )
        self._sharers = sharers
        masked = encode(update, self.frac_bits, max_terms=len(sharers)) + mask_vector(
            self._b, update.size
        )
        seeds = {
            j: pair_seed(self._s, self.client_id, j, self._keys[j][1], self.round_id)
            for j in sharers
            if j != self.client_id
        }
        return apply_pair_masks(masked, self.client_id, seeds)

    def unmask(
        self, survivors: Collection[int], dropped: Collection[int], inbox: dict[int, bytes]
    ) -> dict[int, bytes]:
        """This client's shares for the server: a survivor's ``b`` share, a dropped client's ``s_sk`` share.

        ``inbox``: the ciphertexts other clients made for this one in :meth:`share`, by sender. Raises
        ValueError on a second call in the round, overlapping or incomplete lists, this client listed
        as dropped, or fewer survivors than the threshold. A sender whose ciphertext does not decrypt
        to two shares of ``SEED_BYTES`` is skipped (it sent garbage: its secrets cannot be rebuilt
        from this client).
        """
        from cryptography.exceptions import InvalidTag

        alive, gone = {int(j) for j in survivors}, {int(j) for j in dropped}
        if self._unmasked:
            raise ValueError(
                f"client {self.client_id} already revealed its shares for round {self.round_id}"
            )
        if (
            alive & gone
            or alive | gone != set(self._sharers)
            or self.client_id not in alive
            or len(alive) < self._threshold
        ):
            raise ValueError(
                "survivors and dropped clients must split the masking clients, include this one among "
                f"the survivors, and leave at least {self._threshold} survivors"
            )
        self._unmasked = True
        out = {}
        for u in sorted(alive | gone):
            data = inbox.get(u)
            if data is None or len(data) < 12:
                continue
            cipher, label = _share_cipher(
                self._c, self._keys[u][0], u, self.client_id, self.round_id
            )
            try:
                plain = cipher.decrypt(data[:12], data[12:], label)
            except InvalidTag:
                continue
            if len(plain) != 2 * SEED_BYTES:  # a sender encrypting garbage with the right key
                continue
            out[u] = plain[: len(plain) // 2] if u in alive else plain[len(plain) // 2 :]
        return out


def secaggplus_sum(
    masked: dict[int, np.ndarray],
    keys: Mapping[int, Advertisement],
    sharers: Collection[int],
    shares: dict[int, dict[int, bytes]],
    threshold: int,
    round_id: int,
    frac_bits: int = FRAC_BITS,
) -> np.ndarray:
    """Server side of SecAgg+: the sum ``float64 [D]`` of the survivors' updates.

    Args:
        masked: the survivors' masked inputs ``uint64 [D]`` by client id.
        keys: every client's :meth:`SecAggPlusClient.advertise` from stage 1 (the share indices
            follow their sorted ids; signatures are the clients' to check).
        sharers: the clients told to mask with each other (stage 3); the dropped ones are ``sharers - masked``.
        shares: each responding client's :meth:`SecAggPlusClient.unmask` answer, by responder id.

    Raises ``TypeError`` on non-integer ids; ``ValueError`` naming the client on a malformed
    masked input or share, a responder that held no keys, a threshold that is not a strict
    majority of the key holders, fewer survivors or shares of a secret than ``threshold``, shares
    of a secret that disagree (with more than ``threshold`` of them, two subsets are compared: a
    wrong share is detected, not attributed), a rebuilt self-mask seed that does not match the
    client's commitment or a rebuilt mask key that does not match its public key (a wrong share,
    detected with exactly ``threshold`` shares too: the round is refused naming the client whose
    secret it is, not the client that sent the wrong share).
    """
    keys = check_advertisements(keys)
    length = check_masked(masked)
    alive, everyone = set(check_ids(masked)), set(check_ids(sharers))
    if not alive <= everyone or not everyone <= set(keys):
        raise ValueError(
            "survivors must be among the masking clients, and those among the key holders"
        )
    if not (len(keys) < 2 * threshold and 2 <= threshold <= len(keys)):
        raise ValueError(
            f"threshold {threshold} must be the round's: a strict majority of the {len(keys)} "
            "clients and >= 2"
        )
    if len(alive) < threshold:
        raise ValueError(f"{len(alive)} survivors, fewer than the threshold {threshold}")
    strangers = sorted(set(check_ids(shares, "responder ids")) - set(keys))
    if strangers:
        raise ValueError(f"shares from client {strangers[0]}, which held no keys this round")
    index = {j: k + 1 for k, j in enumerate(sorted(keys))}
    total = np.zeros(length, dtype=np.uint64)
    for vector in masked.values():
        total += vector

    def rebuild(u: int) -> bytes:
        got = {index[v]: check_seed(answer[u], v, u) for v, answer in shares.items() if u in answer}
        if len(got) < threshold:
            raise ValueError(
                f"{len(got)} shares of client {u}'s secret came back; {threshold} are needed"
            )
        points = sorted(got.items())
        secret = _shamir_combine(dict(points[:threshold]))
        if len(points) > threshold and _shamir_combine(dict(points[-threshold:])) != secret:
            raise ValueError(
                f"the shares of client {u}'s secret disagree: a client sent a wrong share, or the "
                "server asked some clients for the other secret"
            )
        return secret

    for u in sorted(alive):
        seed = rebuild(u)
        if seed_commitment(seed, u, round_id) != keys[u].commitment:
            raise ValueError(
                f"the self-mask seed rebuilt for client {u} does not match its commitment (a bad share)"
            )
        total -= mask_vector(seed, total.size)
    for u in sorted(everyone - alive):
        key = X25519PrivateKey.from_private_bytes(rebuild(u))
        if key.public_key().public_bytes_raw() != keys[u].s_pk:
            raise ValueError(
                f"the mask key rebuilt for dropped client {u} does not match its public key (a bad share)"
            )
        for v in alive:
            total = apply_pair_masks(
                total, v, {u: pair_seed(key, u, v, keys[v].s_pk, round_id)}, sign=-1
            )
    return decode(total, frac_bits)
