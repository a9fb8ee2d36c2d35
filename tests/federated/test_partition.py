import numpy as np
import pytest

from pimoe.data.digits import load_digits
from pimoe.federated.partition import dirichlet_partition, iid_partition, label_skew, make_partition

LABELS = load_digits().y.numpy()


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("clients", [1, 7, 100])
def test_iid_is_disjoint_covering_and_balanced(clients):
    parts = iid_partition(LABELS, clients, seed=0)
    assert len(parts) == clients
    _assert_disjoint_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0])
def test_dirichlet_is_disjoint_covering_nonempty(alpha):
    parts = dirichlet_partition(LABELS, 100, alpha, seed=1)
    _assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 1


def test_label_skew_grows_as_alpha_falls():
    skews = [
        label_skew(LABELS, dirichlet_partition(LABELS, 20, a, seed=2)) for a in (100.0, 1.0, 0.1)
    ]
    iid = label_skew(LABELS, iid_partition(LABELS, 20, seed=2))
    assert iid < 0.2
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.6


def test_seeded_and_bad_input():
    a = make_partition(LABELS, 10, "dirichlet", 0.5, seed=3)
    b = make_partition(LABELS, 10, "dirichlet", 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(LABELS, 10, 0.0)
    with pytest.raises(ValueError, match="unknown partition"):
        make_partition(LABELS, 10, "shards")
    with pytest.raises(ValueError, match="at least one"):
        iid_partition(LABELS[:5], 10)
    with pytest.raises(TypeError, match="integers"):
        iid_partition(LABELS.astype(float), 10)


def test_digits_split_is_stratified_disjoint_and_seeded():
    import torch

    from pimoe.data.digits import Split, digits_split

    train, test = digits_split(0.2, 0)
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.dtype == torch.float32 and train.x.min() >= 0 and train.x.max() <= 1
    counts = torch.bincount(test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (174-183 images per class)
    rows = {tuple(r.tolist()) for r in train.x} & {tuple(r.tolist()) for r in test.x}
    assert len(rows) <= 5  # disjoint up to identical images
    again, _ = digits_split(0.2, 0)
    other, _ = digits_split(0.2, 1)
    assert torch.equal(again.y, train.y) and not torch.equal(other.y, train.y)
    with pytest.raises(ValueError, match="same N"):
        Split(torch.zeros(3, 2), torch.zeros(4))


def test_hopeless_draws_are_refused_without_building_client_arrays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Near one client per sample every draw leaves a client empty: the 1,000 draws are checked
    on per-client counts alone (each used to split and join arrays for every client: ~30 s
    before refusing 1,437 clients of 1,437 samples)."""
    splits: list[int] = []
    real = np.split

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        splits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "split", counted)
    with pytest.raises(ValueError, match="no Dirichlet"):
        dirichlet_partition(LABELS[:400], 400, 0.5)
    assert splits == []
    parts = dirichlet_partition(LABELS, 10, 0.5, seed=3)  # a passing draw builds them once
    assert len(splits) == len(np.unique(LABELS))
    _assert_disjoint_cover(parts, len(LABELS))
