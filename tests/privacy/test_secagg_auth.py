"""SecAgg+ stage-1 authentication: the commitment to the self-mask seed catches a wrong ``b_u``
share with exactly the threshold of shares, and a registry of Ed25519 keys stops a relaying
server from replacing a client's keys or adding clients of its own."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cryptography")

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pimoe.privacy.secagg import Advertisement, SecAggPlusClient, decode, encode, secaggplus_sum
from pimoe.privacy.secagg_auth import seed_commitment

DIM, ROUND = 64, 3


def _signing_keys(n: int) -> tuple[dict[int, Ed25519PrivateKey], dict[int, bytes]]:
    """Each client's long-term signing key and the registry {id: raw Ed25519 public key}."""
    keys = {i: Ed25519PrivateKey.generate() for i in range(n)}
    return keys, {i: k.public_key().public_bytes_raw() for i, k in keys.items()}


def _round(n: int, threshold: int, signed: bool = False):
    """Stages 1-3 of a round: clients, advertisements, inboxes, updates, masked inputs, registry."""
    signing, registry = _signing_keys(n)
    clients = {i: SecAggPlusClient(i, ROUND) for i in range(n)}
    ads = {i: c.advertise(signing[i] if signed else None) for i, c in clients.items()}
    outbox = {i: c.share(ads, threshold, registry if signed else None) for i, c in clients.items()}
    inbox = {v: {u: outbox[u][v] for u in clients} for v in clients}
    updates = {i: np.full(DIM, 0.25 * (i + 1), np.float32) for i in clients}
    masked = {i: c.mask(updates[i], sharers=clients) for i, c in clients.items()}
    return clients, ads, inbox, updates, masked, registry


def _exact(total: np.ndarray, updates: dict[int, np.ndarray], alive) -> None:
    plain = np.sum([encode(updates[i]) for i in alive], axis=0, dtype=np.uint64)
    np.testing.assert_array_equal(total, decode(plain))


def test_a_wrong_self_mask_share_with_exactly_threshold_shares_is_refused() -> None:
    """Three survivors of five, threshold 3: each survivor's ``b_u`` is rebuilt from exactly three
    shares, so no two subsets can be compared. Before the commitment, survivor 2 sending a wrong
    share of client 0's ``b_u`` gave a sum of noise, silently."""
    clients, ads, inbox, updates, masked, _ = _round(5, threshold=3)
    dropped = {3, 4}
    alive = {i: masked[i] for i in masked if i not in dropped}
    shares = {v: clients[v].unmask(alive, dropped, inbox[v]) for v in alive}
    _exact(secaggplus_sum(alive, ads, clients, shares, 3, ROUND), updates, alive)
    forged = bytes(b ^ 1 for b in shares[2][0])  # the malicious client's share of b_0
    with pytest.raises(ValueError, match="seed rebuilt for client 0 does not match its commitment"):
        secaggplus_sum(alive, ads, clients, {**shares, 2: {**shares[2], 0: forged}}, 3, ROUND)


def test_the_commitment_binds_the_round_and_the_client() -> None:
    seed = bytes(range(32))
    assert (
        len({seed_commitment(seed, 0, 1), seed_commitment(seed, 0, 2), seed_commitment(seed, 1, 1)})
        == 3
    )
    client = SecAggPlusClient(4, ROUND)
    assert client.advertise().commitment == seed_commitment(client._b, 4, ROUND)


def test_a_signed_round_with_a_registry_gives_the_exact_sum() -> None:
    clients, ads, inbox, updates, masked, _ = _round(5, threshold=3, signed=True)
    assert all(ad.signature is not None and len(ad.signature) == 64 for ad in ads.values())
    alive = {i: masked[i] for i in masked if i != 1}
    shares = {v: clients[v].unmask(alive, {1}, inbox[v]) for v in alive}
    _exact(secaggplus_sum(alive, ads, clients, shares, 3, ROUND), updates, alive)


def _stage1(n: int = 5):
    signing, registry = _signing_keys(n)
    clients = {i: SecAggPlusClient(i, ROUND) for i in range(n)}
    return clients, {i: c.advertise(signing[i]) for i, c in clients.items()}, registry, signing


def test_a_server_replacing_a_clients_keys_is_refused_under_a_registry() -> None:
    clients, ads, registry, _ = _stage1()
    impostor = SecAggPlusClient(2, ROUND)  # the server's own keys for client 2
    server_key = Ed25519PrivateKey.generate()
    swaps = {
        "kept signature": impostor.advertise()._replace(signature=ads[2].signature),
        "server's signature": impostor.advertise(server_key),
        "unsigned": impostor.advertise(),
    }
    for fake in swaps.values():
        for i in (0, 1, 3, 4):
            with pytest.raises(ValueError, match="client 2's advertised keys"):
                clients[i].share({**ads, 2: fake}, 3, registry)
    assert len(clients[0].share(ads, 3, registry)) == 5  # the genuine keys pass
    # without a registry the swap goes through: an honest-but-curious server only
    assert len(clients[0].share({**ads, 2: swaps["server's signature"]}, 3)) == 5


def test_a_sybil_client_added_by_the_server_is_refused_under_a_registry() -> None:
    """Four Sybils would give the server a majority of nine clients (threshold 5)."""
    clients, ads, registry, _ = _stage1()
    sybils = {
        j: SecAggPlusClient(j, ROUND).advertise(Ed25519PrivateKey.generate()) for j in range(5, 9)
    }
    with pytest.raises(ValueError, match="client 5 is not in the key registry"):
        clients[0].share({**ads, **sybils}, 5, registry)


def test_keys_signed_for_another_round_are_refused() -> None:
    clients, ads, registry, signing = _stage1(3)
    old = SecAggPlusClient(1, ROUND - 1).advertise(signing[1])  # replayed from the last round
    with pytest.raises(ValueError, match="client 1's advertised keys .* round 3"):
        clients[0].share({**ads, 1: old}, 2, registry)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ad: ad[:2], "client 1's advertised keys must be"),
        (lambda ad: ad._replace(commitment=b"short"), "client 1's advertised commitment"),
        (lambda ad: ad._replace(signature=b"x" * 10), "client 1's advertised signature"),
    ],
)
def test_a_malformed_advertisement_is_refused_naming_its_client(edit, match) -> None:
    clients, ads, registry, _ = _stage1(3)
    bad: dict[int, Advertisement] = {**ads, 1: edit(ads[1])}
    with pytest.raises(ValueError, match=match):
        clients[0].share(bad, 2, registry)
    with pytest.raises(ValueError, match=match):
        secaggplus_sum({0: np.zeros(4, np.uint64)}, bad, {0}, {}, 2, ROUND)


def test_a_malformed_registry_entry_is_refused() -> None:
    clients, ads, registry, _ = _stage1(3)
    with pytest.raises(ValueError, match="registry's key of client 2"):
        clients[0].share(ads, 2, {**registry, 2: b"short"})
