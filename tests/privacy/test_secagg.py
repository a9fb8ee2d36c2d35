import numpy as np
import pytest
from scipy import stats

from pimoe.privacy.secagg import FRAC_BITS, SecAggClient, decode, encode, unmask_sum

DIM = 4096


def _round(n: int, seed: int = 0, round_id: int = 0, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    clients = {i: SecAggClient(i) for i in range(n)}
    keys = {i: c.public_key() for i, c in clients.items()}
    updates = {i: (scale * rng.standard_normal(DIM)).astype(np.float32) for i in clients}
    masked = {i: c.mask(updates[i], keys, round_id=round_id) for i, c in clients.items()}
    return clients, updates, masked


def test_sum_is_exact_to_fixed_point_precision() -> None:
    clients, updates, masked = _round(7)
    total = unmask_sum(masked, participants=clients)
    expected = np.sum([u.astype(np.float64) for u in updates.values()], axis=0)
    assert np.abs(total - expected).max() <= 7 * 0.5 * 2.0**-FRAC_BITS
    # bit-exact against the sum of the unmasked encodings
    plain = np.sum([encode(u) for u in updates.values()], axis=0, dtype=np.uint64)
    np.testing.assert_array_equal(total, decode(plain))


def test_masks_cancel_only_in_the_full_sum() -> None:
    _clients, updates, masked = _round(4)
    partial = unmask_sum({i: masked[i] for i in (0, 1, 2)}, participants=(0, 1, 2))
    expected = sum(updates[i].astype(np.float64) for i in (0, 1, 2))
    assert np.abs(partial - expected).mean() > 1e6  # client 3's pair masks are still in there


def test_dropped_client_masks_are_removed_with_revealed_seeds() -> None:
    clients, updates, masked = _round(6, seed=1)
    dropped = {2, 5}
    survivors = {i: m for i, m in masked.items() if i not in dropped}
    revealed = {i: clients[i].reveal_seeds_for(dropped) for i in survivors}
    total = unmask_sum(survivors, participants=clients, revealed=revealed)
    expected = sum(updates[i].astype(np.float64) for i in survivors)
    assert np.abs(total - expected).max() <= 6 * 2.0**-FRAC_BITS
    with pytest.raises(ValueError, match="dropped clients are"):
        unmask_sum(survivors, participants=clients)  # nobody revealed anything
    missing = dict(revealed)
    missing[0] = clients[0].reveal_seeds_for({2})
    with pytest.raises(ValueError, match="client 0 revealed seeds for \\[2\\]"):
        unmask_sum(survivors, participants=clients, revealed=missing)


def test_server_cannot_get_seeds_of_a_client_whose_input_it_holds() -> None:
    clients, _, masked = _round(3)
    with pytest.raises(ValueError, match="alive"):
        clients[1].reveal_seeds_for({1})
    revealed = {i: clients[i].reveal_seeds_for({2}) for i in (0, 1)}
    with pytest.raises(ValueError, match="dropped clients are \\[\\]"):
        unmask_sum(masked, participants=clients, revealed=revealed)


def test_masked_input_is_indistinguishable_from_uniform_noise() -> None:
    _clients, updates, masked = _round(5, seed=2, scale=1.0)
    view = masked[3]
    unit = view.astype(np.float64) / 2.0**64  # the server's view, mapped to [0, 1)
    assert stats.kstest(unit, "uniform").pvalue > 1e-3
    counts = np.bincount((view >> np.uint64(56)).astype(np.int64), minlength=256)  # top byte
    assert stats.chisquare(counts).pvalue > 1e-3
    r = np.corrcoef(unit, updates[3])[0, 1]
    assert abs(r) < 4 / np.sqrt(DIM)
    # the same tests do detect an unmasked encoding
    plain = encode(updates[3]).astype(np.float64) / 2.0**64
    assert stats.kstest(plain, "uniform").pvalue < 1e-6


def test_masks_change_every_round() -> None:
    rng = np.random.default_rng(0)
    clients = {i: SecAggClient(i) for i in range(3)}
    keys = {i: c.public_key() for i, c in clients.items()}
    update = rng.standard_normal(DIM).astype(np.float32)
    first, second = (
        clients[0].mask(update, keys, round_id=1),
        clients[0].mask(update, keys, round_id=2),
    )
    assert np.mean(first == second) < 0.01
    np.testing.assert_array_equal(first, clients[0].mask(update, keys, round_id=1))


def test_pair_seed_is_symmetric_and_key_can_be_restored() -> None:
    a, b = SecAggClient(3), SecAggClient(8)
    assert a.pair_seed(8, b.public_key(), 5) == b.pair_seed(3, a.public_key(), 5)
    assert a.pair_seed(8, b.public_key(), 5) != a.pair_seed(8, b.public_key(), 6)
    restored = SecAggClient(3, private_key=a.private_key_bytes())
    assert restored.public_key() == a.public_key()
    assert restored.pair_seed(8, b.public_key(), 5) == a.pair_seed(8, b.public_key(), 5)
    with pytest.raises(ValueError, match="32 raw bytes"):
        SecAggClient(3, private_key=b"short")


@pytest.mark.parametrize(
    ("update", "error", "match"),
    [
        (np.zeros((2, 3), np.float32), TypeError, "1-D float"),
        (np.arange(4), TypeError, "1-D float"),
        (np.array([1.0, np.nan], np.float32), ValueError, "NaN"),
        (np.array([], np.float32), ValueError, "empty"),
        (np.array([1e12], np.float64), ValueError, "overflow"),
    ],
)
def test_bad_updates_rejected(update, error, match) -> None:
    a, b = SecAggClient(0), SecAggClient(1)
    with pytest.raises(error, match=match):
        a.mask(update, {1: b.public_key()})


def test_bad_keys_and_shapes_rejected() -> None:
    a, b = SecAggClient(0), SecAggClient(1)
    update = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="public key"):
        a.mask(update, {1: b"short"})
    with pytest.raises(ValueError, match="at least one peer"):
        a.mask(update, {0: a.public_key()})
    keys = {0: a.public_key(), 1: b.public_key()}
    masked = {0: a.mask(update, keys), 1: b.mask(np.ones(9, np.float32), keys)}
    with pytest.raises(ValueError, match="one length"):
        unmask_sum(masked, participants=(0, 1))
    with pytest.raises(ValueError, match="not participants"):
        unmask_sum({0: masked[0]}, participants=(1,))


# --- SecAgg+: self-masks and Shamir-shared recovery ---

from pimoe.privacy.secagg import SecAggPlusClient, secaggplus_sum  # noqa: E402


def _plus_round(n: int, threshold: int, round_id: int = 3, seed: int = 0):
    """Stages 1-3 of a SecAgg+ round: clients, their keys, every client's inbox, updates and masked inputs."""
    rng = np.random.default_rng(seed)
    clients = {i: SecAggPlusClient(i, round_id) for i in range(n)}
    keys = {i: c.advertise() for i, c in clients.items()}
    outbox = {i: c.share(keys, threshold) for i, c in clients.items()}
    inbox = {v: {u: outbox[u][v] for u in clients} for v in clients}
    updates = {i: (0.1 * rng.standard_normal(DIM)).astype(np.float32) for i in clients}
    masked = {i: c.mask(updates[i], sharers=clients) for i, c in clients.items()}
    return clients, keys, inbox, updates, masked


def test_secaggplus_sum_with_dropouts_is_exact():
    clients, keys, inbox, updates, masked = _plus_round(7, threshold=4)
    dropped = {1, 5}
    alive = {i: m for i, m in masked.items() if i not in dropped}
    shares = {v: clients[v].unmask(alive, dropped, inbox[v]) for v in alive}
    total = secaggplus_sum(alive, keys, clients, shares, threshold=4, round_id=3)
    plain = np.sum([encode(updates[i]) for i in alive], axis=0, dtype=np.uint64)
    np.testing.assert_array_equal(total, decode(plain))
    # a survivor's masked input alone is hidden by its self-mask even with all its pair masks removed
    assert np.abs(decode(masked[0]) - updates[0]).mean() > 1e6


def test_a_server_that_lies_about_a_dropout_cannot_rebuild_both_secrets():
    """Client 0 sent its input; the server calls it dropped to some clients and alive to the others."""
    n, t = 7, 4
    clients, keys, inbox, _updates, masked = _plus_round(n, threshold=t, seed=1)
    everyone = set(clients)
    lied_to = {1, 2, 3}  # told "0 dropped": they reveal its s_sk share
    shares = {}
    for v in everyone - {0}:
        dropped = {0} if v in lied_to else set()
        survivors = everyone - dropped
        shares[v] = clients[v].unmask(survivors, dropped, inbox[v])
    with pytest.raises(
        ValueError, match="already revealed"
    ):  # asking again, with the other story, is refused
        clients[4].unmask(everyone - {0}, {0}, inbox[4])
    s_shares = sum(1 for v in lied_to if 0 in shares[v])
    b_shares = sum(1 for v in everyone - {0} - lied_to if 0 in shares[v])
    assert (
        s_shares < t and b_shares < t
    )  # a strict-majority threshold: at most one secret can reach t
    with pytest.raises(
        ValueError, match="client 0"
    ):  # 0 as dropped: its mask key cannot be rebuilt
        secaggplus_sum(
            {i: masked[i] for i in everyone - {0}}, keys, clients, shares, threshold=t, round_id=3
        )
    # 0 as a survivor: the mixed b / s_sk shares disagree (they used to give a sum of noise)
    with pytest.raises(ValueError, match="client 0's secret disagree"):
        secaggplus_sum(masked, keys, clients, shares, threshold=t, round_id=3)


def test_secaggplus_refuses_bad_requests():
    clients, keys, inbox, _, _ = _plus_round(5, threshold=3)
    c = clients[0]
    fresh = SecAggPlusClient(9, 3)
    with pytest.raises(ValueError, match="strict majority"):
        fresh.share(
            {**keys, 9: fresh.advertise()}, threshold=2
        )  # 2 of 6: a lying server could get both secrets
    with pytest.raises(ValueError, match="own keys"):
        fresh.share(keys, threshold=3)
    with pytest.raises(ValueError, match="split the masking clients"):
        c.unmask({0, 1, 2}, {2, 3, 4}, inbox[0])  # client 2 both alive and dropped
    with pytest.raises(ValueError, match="split the masking clients"):
        c.unmask({1, 2, 3, 4}, {0}, inbox[0])  # this client called dropped
    restored = SecAggPlusClient(0, 3, state=c.state())
    assert restored.public_keys() == c.public_keys()
    garbage = {**inbox[0], 1: b"\0" * 80}
    assert 1 not in restored.unmask(
        set(clients), set(), garbage
    )  # a sender's garbage share is skipped
    with pytest.raises(ValueError, match="round 3, not"):
        SecAggPlusClient(0, 4, state=c.state())
