"""Secure aggregation against malicious clients and a careless or lying relay: malformed shares
and seeds, wrong lengths, duplicated ids and replayed keys, crafted client state and dropouts past
the threshold. Each is a ValueError/TypeError naming the problem, never a silently wrong sum."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("cryptography")

from pimoe.privacy.secagg import (
    SecAggClient,
    SecAggPlusClient,
    decode,
    encode,
    secaggplus_sum,
    unmask_sum,
)

DIM = 64


def _plain_round(n: int = 3):
    clients = {i: SecAggClient(i) for i in range(n)}
    keys = {i: c.public_key() for i, c in clients.items()}
    update = np.full(DIM, 0.25, np.float32)
    masked = {i: c.mask(update, keys) for i, c in clients.items()}
    return clients, keys, masked


def _plus_round(n: int = 5, threshold: int = 3, round_id: int = 1):
    clients = {i: SecAggPlusClient(i, round_id) for i in range(n)}
    keys = {i: c.advertise() for i, c in clients.items()}
    outbox = {i: c.share(keys, threshold) for i, c in clients.items()}
    inbox = {v: {u: outbox[u][v] for u in clients} for v in clients}
    updates = {i: np.full(DIM, 0.5 * (i + 1), np.float32) for i in clients}
    masked = {i: c.mask(updates[i], sharers=clients) for i, c in clients.items()}
    return clients, keys, inbox, updates, masked


@pytest.mark.parametrize("seed", [b"\0" * 16, b"\0" * 7, "00" * 32, None])
def test_a_revealed_seed_of_the_wrong_size_or_type_is_refused(seed: object) -> None:
    """Before: a 16-byte seed was taken as an AES-128 key (a silently wrong sum); other sizes and
    types failed deep in ``cryptography``."""
    clients, keys, masked = _plain_round()
    alive = {i: masked[i] for i in (0, 1)}
    revealed = {0: clients[0].reveal_seeds_for([2]), 1: {2: seed}}
    with pytest.raises((ValueError, TypeError), match="client 1"):
        unmask_sum(alive, participants=keys, revealed=revealed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "vector",
    [[1, 2, 3], np.zeros(0, np.uint64), np.zeros(DIM, np.int64), np.zeros((2, 32), np.uint64)],
)
def test_a_malformed_masked_input_is_refused_naming_its_client(vector: object) -> None:
    _clients, keys, masked = _plain_round()
    masked[2] = vector  # type: ignore[assignment]
    with pytest.raises((ValueError, TypeError), match="client 2"):
        unmask_sum(masked, participants=keys)
    pclients, pkeys, _inbox, _, pmasked = _plus_round()
    pmasked[2] = vector  # type: ignore[assignment]
    with pytest.raises((ValueError, TypeError), match="client 2"):
        secaggplus_sum(pmasked, pkeys, pclients, {}, threshold=3, round_id=1)


@pytest.mark.parametrize("other", ["1", 1.0, True])
def test_ids_that_are_not_integers_are_refused(other: object) -> None:
    """Before: ``{1: k1, "1": k2}`` collapsed to one peer through ``int()``, silently."""
    a, b, c = SecAggClient(0), SecAggClient(1), SecAggClient(2)
    with pytest.raises(TypeError, match="client ids"):
        a.mask(np.ones(4, np.float32), {other: b.public_key(), 2: c.public_key()})  # type: ignore[dict-item]
    _clients, keys, *_ = _plus_round()
    fresh = SecAggPlusClient(0, 1)
    with pytest.raises(TypeError, match="client ids"):
        fresh.share({other: keys[1], **{j: keys[j] for j in (2, 3)}, 0: fresh.advertise()}, 3)  # type: ignore[dict-item]


def test_a_replayed_public_key_is_refused() -> None:
    """Two ids with one key: a relay replaying client 1's key as client 2's would make every pair
    seed of client 2 computable by client 1."""
    a, b = SecAggClient(0), SecAggClient(1)
    with pytest.raises(ValueError, match="same public key"):
        a.mask(np.ones(4, np.float32), {1: b.public_key(), 2: b.public_key()})
    _clients, keys, *_ = _plus_round()
    fresh = SecAggPlusClient(0, 1)
    replayed = {**keys, 0: fresh.advertise(), 4: keys[3]}
    with pytest.raises(ValueError, match="same public key"):
        fresh.share(replayed, threshold=3)


def test_an_odd_length_share_from_a_malicious_sender_is_skipped() -> None:
    """A sender holding the right channel key encrypts a plaintext of the wrong length: before,
    the receiver cut it in two and passed a short share on to the server."""
    from pimoe.privacy.secaggplus import _share_cipher

    clients, keys, inbox, _, _ = _plus_round()
    # client 1 (malicious) re-encrypts a 10-byte "share" for client 0 with its real channel key
    cipher, label = _share_cipher(clients[1]._c, keys[0][0], 1, 0, 1)
    inbox[0][1] = b"\0" * 12 + cipher.encrypt(b"\0" * 12, b"x" * 10, label)
    assert 1 not in clients[0].unmask(set(clients), set(), inbox[0])


def test_shares_from_unknown_responders_or_of_the_wrong_size_are_refused() -> None:
    clients, keys, inbox, _, masked = _plus_round()
    shares = {v: clients[v].unmask(set(clients), set(), inbox[v]) for v in clients}
    with pytest.raises(ValueError, match="client 9"):  # before: KeyError 9
        secaggplus_sum(masked, keys, clients, {**shares, 9: shares[0]}, threshold=3, round_id=1)
    short = {**shares, 1: {**shares[1], 2: shares[1][2][:5]}}
    with pytest.raises(ValueError, match="client 1"):
        secaggplus_sum(masked, keys, clients, short, threshold=3, round_id=1)


@pytest.mark.parametrize("threshold", [1, 2, 6])
def test_the_server_threshold_must_be_the_rounds_strict_majority(threshold: int) -> None:
    """Before: ``threshold=1`` rebuilt every self-mask from one share (wrong values, silently: a
    sum of noise)."""
    clients, keys, inbox, _, masked = _plus_round()
    shares = {v: clients[v].unmask(set(clients), set(), inbox[v]) for v in clients}
    with pytest.raises(ValueError, match="strict majority"):
        secaggplus_sum(masked, keys, clients, shares, threshold=threshold, round_id=1)


def test_inconsistent_shares_are_detected_when_more_than_threshold_came_back() -> None:
    """A malicious client's wrong ``b`` share: with more than ``t`` shares of a secret, two
    subsets of ``t`` disagree and the round is refused (before: a sum of noise, silently)."""
    clients, keys, inbox, updates, masked = _plus_round()
    shares = {v: clients[v].unmask(set(clients), set(), inbox[v]) for v in clients}
    good = secaggplus_sum(masked, keys, clients, shares, threshold=3, round_id=1)
    plain = np.sum([encode(u) for u in updates.values()], axis=0, dtype=np.uint64)
    np.testing.assert_array_equal(good, decode(plain))
    bad = {**shares, 4: {**shares[4], 0: bytes(32)}}
    with pytest.raises(ValueError, match="client 0"):
        secaggplus_sum(masked, keys, clients, bad, threshold=3, round_id=1)


def test_dropouts_past_the_threshold_are_refused_by_server_and_clients() -> None:
    clients, keys, inbox, _, masked = _plus_round()
    alive = {0, 1}  # 3 of 5 dropped; threshold 3
    with pytest.raises(ValueError, match="at least 3 survivors"):
        clients[0].unmask(alive, set(clients) - alive, inbox[0])
    with pytest.raises(ValueError, match="2 survivors"):
        secaggplus_sum({i: masked[i] for i in alive}, keys, clients, {}, threshold=3, round_id=1)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.pop("b"),
        lambda s: s.update(b="zz"),
        lambda s: s.update(c="00" * 5),
        lambda s: s.update(threshold="3"),
        lambda s: s.update(keys=[1, 2]),
        lambda s: s.update(sharers={"a": 1}),
        lambda s: s.update(unmasked=1),
    ],
)
def test_a_crafted_client_state_is_a_value_error(edit) -> None:
    clients, *_ = _plus_round()
    state = json.loads(clients[0].state())
    edit(state)
    with pytest.raises(ValueError, match="state"):
        SecAggPlusClient(0, 1, state=json.dumps(state).encode())
    with pytest.raises(ValueError, match="state"):
        SecAggPlusClient(0, 1, state=b"\xff not json")
