import numpy as np
import pytest

from pimoe.search.hypervolume import hypervolume, normalize, pareto_mask, shared_hypervolumes


def monte_carlo_hypervolume(
    points: np.ndarray, reference: np.ndarray, samples: int, seed: int
) -> float:
    rng = np.random.default_rng(seed)
    low = points.min(axis=0)
    box = rng.uniform(low, reference, size=(samples, len(reference)))  # [S, d]
    dominated = (points[None, :, :] <= box[:, None, :]).all(axis=2).any(axis=1)
    return float(dominated.mean() * np.prod(reference - low))


def test_two_points_by_hand() -> None:
    # (1,2) and (2,1) under (3,3): two 2x1 rectangles overlapping in a 1x1 square -> 3
    assert hypervolume([[1, 2], [2, 1]], [3, 3]) == pytest.approx(3.0)


def test_three_d_by_inclusion_exclusion() -> None:
    a, b = np.array([0.0, 0.0, 0.5]), np.array([0.5, 0.5, 0.0])
    ref = np.ones(3)
    both = np.prod(ref - np.maximum(a, b))
    expected = np.prod(ref - a) + np.prod(ref - b) - both  # 0.5 + 0.25 - 0.125
    assert hypervolume([a, b], ref) == pytest.approx(expected)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_matches_monte_carlo(dims: int) -> None:
    rng = np.random.default_rng(dims)
    points = rng.uniform(0, 1, size=(12, dims))
    ref = np.full(dims, 1.1)
    exact = hypervolume(points, ref)
    estimate = monte_carlo_hypervolume(points, ref, samples=200_000, seed=0)
    assert exact == pytest.approx(estimate, rel=0.02)


def test_dominated_and_outside_points_add_nothing() -> None:
    front = np.array([[0.2, 0.8, 0.5], [0.6, 0.1, 0.4], [0.5, 0.5, 0.1]])
    ref = np.ones(3)
    extra = np.vstack([front, [[0.7, 0.9, 0.6], [1.5, 0.0, 0.0]]])  # dominated; beyond ref
    assert hypervolume(extra, ref) == pytest.approx(hypervolume(front, ref))
    assert hypervolume([[2.0, 2.0]], [1.0, 1.0]) == 0.0


def test_pareto_mask_matches_brute_force() -> None:
    points = np.random.default_rng(1).integers(0, 5, size=(40, 3)).astype(float)
    expected = [not any(np.all(q <= p) and np.any(q < p) for q in points) for p in points]
    assert pareto_mask(points).tolist() == expected


def test_shared_normalization_compares_sets() -> None:
    better = [[0.0, 1.0], [1.0, 0.0], [0.4, 0.4]]
    worse = [[0.0, 1.0], [1.0, 0.0]]
    volumes = shared_hypervolumes({"a": better, "b": worse, "empty": []})
    assert volumes["a"] > volumes["b"] > 0 and volumes["empty"] == 0.0
    # under the union's normalization, the union's corners are 0 and 1
    assert normalize(better, [0, 0], [1, 1]).tolist() == better


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        hypervolume([[np.nan, 1.0]], [2.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        hypervolume([[1.0, 1.0]], [2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        pareto_mask([1.0, 2.0])
