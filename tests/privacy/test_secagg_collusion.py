"""The open SecAgg+ gap, pinned: a server colluding with a registered client reads an honest
client's update once ``2t <= n + c``, keys signed and checked under a registry or not.

The server splits the honest clients in two halves and tells each half a different survivor set,
each its half plus the colluder: one half gives the ``b_u`` shares of the target ``u``, the other
its mask-key shares, and the colluder gives both. Every honest client answers once, with one kind
of share per client, as the protocol asks. Each view is also backed by ``t`` distinct clients
(its honest half, each of them signing only this view, and the colluder, signing both), so
Bonawitz et al.'s signed consistency round (``t`` signatures over the survivor set a client is
asked about) would pass in every honest client too: only ``2t > n + c`` stops this attack.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cryptography")

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pimoe.privacy.masking import apply_pair_masks, decode, mask_vector, pair_seed
from pimoe.privacy.secaggplus import SecAggPlusClient, _shamir_combine

DIM, ROUND, TARGET, COLLUDER = 8, 5, 0, 4


def _split_view(threshold: int, views: list[tuple[set[int], set[int]]]) -> bool:
    """Five registered clients, client 4 colluding; ``views``: (honest clients asked, the survivor
    set they are told), each view also answered by client 4. Whether the server reads the
    target's update (asserted exact) from the shares it collects."""
    signing = {i: Ed25519PrivateKey.generate() for i in range(5)}
    registry = {i: k.public_key().public_bytes_raw() for i, k in signing.items()}
    clients = {i: SecAggPlusClient(i, ROUND) for i in range(5)}
    ads = {i: c.advertise(signing[i]) for i, c in clients.items()}
    outbox = {i: c.share(ads, threshold, registry) for i, c in clients.items()}
    inbox = {v: {u: outbox[u][v] for u in clients} for v in clients}
    update = np.full(DIM, 1.75, np.float32)
    masked = {i: c.mask(update if i == TARGET else update * 0, clients) for i, c in clients.items()}
    saved = clients[COLLUDER].state()
    b_shares, s_shares = {}, {}
    for asked, view in views:
        colluder = SecAggPlusClient(COLLUDER, ROUND, state=saved)  # answers every view
        for v, client in [*((v, clients[v]) for v in asked), (COLLUDER, colluder)]:
            answer = client.unmask(view, set(clients) - view, inbox[v])
            (b_shares if TARGET in view else s_shares)[v + 1] = answer[TARGET]
    if min(len(b_shares), len(s_shares)) < threshold:
        return False
    b_u = _shamir_combine(dict(sorted(b_shares.items())[:threshold]))
    s_sk = _shamir_combine(dict(sorted(s_shares.items())[:threshold]))
    key = X25519PrivateKey.from_private_bytes(s_sk)
    assert key.public_key().public_bytes_raw() == ads[TARGET].s_pk
    seeds = {v: pair_seed(key, TARGET, v, ads[v].s_pk, ROUND) for v in clients if v != TARGET}
    plain = apply_pair_masks(masked[TARGET] - mask_vector(b_u, DIM), TARGET, seeds, sign=-1)
    np.testing.assert_array_equal(decode(plain), np.full(DIM, 1.75))  # the target's update
    return True


def test_one_colluder_reads_an_honest_update_at_the_strict_majority_of_five() -> None:
    """n = 5, t = 3 (the smallest strict majority), c = 1: 2t = 6 <= n + c."""
    views = [({0, 1}, {0, 1, COLLUDER}), ({2, 3}, {2, 3, COLLUDER})]
    assert all(len(view) >= 3 for _, view in views)  # each view: t clients would sign it
    assert _split_view(3, views)


def test_a_threshold_above_half_of_n_plus_c_leaves_a_half_short() -> None:
    """t = 4: 2t = 8 > n + c = 6, and four honest clients cannot make two halves of t - c = 3:
    the second view can name four survivors, but clients 1 and 2 answer once per round, leaving
    only client 3 and the colluder to ask."""
    first = ({0, 1, 2}, {0, 1, 2, COLLUDER})
    assert not _split_view(4, [first, ({3}, {1, 2, 3, COLLUDER})])
    with pytest.raises(ValueError, match="client 1 already revealed its shares"):
        _split_view(4, [first, ({1, 2, 3}, {1, 2, 3, COLLUDER})])


def test_clients_told_to_expect_a_colluder_refuse_the_threshold_it_breaks() -> None:
    """``share(..., colluders=1)``: the t = 3 of the first test is refused by every client
    (2t = 6 <= n + c), t = 4 is accepted; bad colluder counts are refused."""
    clients = {i: SecAggPlusClient(i, ROUND) for i in range(5)}
    ads = {i: c.advertise() for i, c in clients.items()}
    for client in clients.values():
        with pytest.raises(ValueError, match=r"plus 1 colluders \(2t > n \+ c\)"):
            client.share(ads, 3, colluders=1)
    assert len(clients[0].share(ads, 4, colluders=1)) == 5
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="colluders must be an int"):
            clients[1].share(ads, 4, colluders=bad)  # type: ignore[arg-type]
