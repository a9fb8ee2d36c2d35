"""The client side of one homomorphic-aggregation round: what it encrypts and what it agrees to decrypt.

Every key holder can decrypt any ciphertext, so a client must not decrypt whatever the server
sends: a server that forwards one client's ciphertext as "the sum" would read that update. Each
client therefore adds a tag vector before encrypting, ``t_i = PRF(K, round, participants, i)``
uniform in ``[-R, R]`` per value (``R = TAG_BUDGET / len(participants)``, so the sum of all tags
stays inside what CKKS at scale 2^40 with a 60-bit first modulus holds, ``|v| < 2^19``), where ``K`` is derived from the shared secret CKKS
context (the server, holding only the public context, cannot compute tags). To decrypt, the server
names the contributors ``S``; the client

1. decrypts at most once per round, only for the round it last encrypted for;
2. requires ``S`` to be a strict majority of the participants announced to it for that round;
3. refuses a ciphertext equal to its own submission;
4. subtracts ``sum_{i in S} t_i`` and releases the result only if every value is small
   (``|v| <= R / 4``; so an honest sum must stay below that too): any other combination of ciphertexts (one client's, a subset
   other than ``S``, slot-wise mixtures by plaintext multiplication) leaves unknown tags of size
   ``R`` in it, and the client refuses, so the server gets nothing.

What the server can still learn: the sum over ``S`` (the aggregate, by design); and, because
different clients may each decrypt once, several different majority sums of the same round if it
asks several clients with different ``S``: their difference is the sum of the clients in which
they differ, down to one client's update when two majorities differ by one client. Only
threshold / multi-key decryption (not available in TenSEAL) closes that.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from pimoe.federated.records import as_int, as_list, config
from pimoe.privacy.he import decrypt_mean, encrypt_update, load_context
from pimoe.privacy.masking import mask_vector

HE_STATE = "he-state"
TAG_BUDGET = 2.0**18  # the largest sum of all participants' tags (CKKS here holds |values| < 2^19)


def tag_range(participants: int) -> float:
    """``R``: each tag value is uniform in ``[-R, R]``."""
    return TAG_BUDGET / participants


def _tag(
    he_context: bytes, server_round: int, participants: list[int], client: int, length: int
) -> np.ndarray:
    """``float64 [length]`` uniform in ``[-R, R]``: client ``client``'s tag in this round."""
    key = hashlib.sha256(b"pimoe-he-tag-key|" + he_context).digest()
    label = f"{server_round}|{','.join(map(str, sorted(participants)))}|{client}".encode()
    seed = hashlib.sha256(key + label).digest()
    r = tag_range(len(participants))
    return (mask_vector(seed, length) >> np.uint64(11)).astype(np.float64) / 2.0**53 * 2 * r - r


def encrypt_for_round(
    he_context: bytes,
    state: RecordDict,
    server_round: int,
    participants: list[int],
    client: int,
    vector: np.ndarray,
) -> list[bytes]:
    """Encrypt ``vector [D]`` plus this client's tag; remember the round, its participants and the ciphertext hash."""
    if client not in participants:
        raise ValueError(f"client {client} is not among the round's announced participants")
    chunks = encrypt_update(
        load_context(he_context),
        vector + _tag(he_context, server_round, participants, client, vector.size),
    )
    state[HE_STATE] = ConfigRecord(
        {
            "round": server_round,
            "participants": [str(p) for p in participants],
            "submitted": hashlib.sha256(b"".join(chunks)).digest(),
            "decrypted": False,
        }
    )
    return chunks


def decrypt_aggregate(
    he_context: bytes,
    state: RecordDict,
    server_round: int,
    chunks: list[bytes],
    contributors: list[int],
    length: int,
) -> np.ndarray:
    """The decrypted sum ``float64 [length]`` over ``contributors``, under the rules in the module docstring.

    Raises ValueError (and releases nothing) when a rule is broken.
    """
    if HE_STATE not in state or as_int(config(state, HE_STATE)["round"]) != server_round:
        raise ValueError(
            f"this client did not encrypt for round {server_round}; it decrypts only that round's sum"
        )
    record = config(state, HE_STATE)
    if record["decrypted"]:
        raise ValueError(f"this client already decrypted once in round {server_round}")
    record["decrypted"] = True  # a refused request also uses the round's one decryption
    participants = [int(p) for p in as_list(record["participants"])]
    chosen = set(contributors)
    if (
        len(chosen) != len(contributors)
        or not chosen <= set(participants)
        or 2 * len(chosen) <= len(participants)
    ):
        raise ValueError(
            f"the contributors must be distinct, announced participants and a strict majority of the "
            f"{len(participants)}; got {len(contributors)}"
        )
    if hashlib.sha256(b"".join(chunks)).digest() == record["submitted"]:
        raise ValueError("asked to decrypt this client's own submission")
    values = decrypt_mean(load_context(he_context), chunks, 1, length)
    values -= sum(_tag(he_context, server_round, participants, i, length) for i in chosen)
    if (
        not np.isfinite(values).all()
        or np.abs(values[:-1]).max() > tag_range(len(participants)) / 4
    ):
        raise ValueError("the ciphertext is not the sum of the named contributors' submissions")
    return values
