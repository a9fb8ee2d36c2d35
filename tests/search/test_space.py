import pytest

from pimoe.moe.model import LMConfig
from pimoe.search.space import FEATURE_NAMES, Compression, SearchSpace

PARAMS = dict(
    n_layer=2,
    d_model=32,
    num_experts=2,
    top_k=2,
    ffn_dim=32,
    shared_experts=1,
    moe_every=2,
    bits=8,
    sparsity=0.3,
    low_rank_ratio=0.5,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_layer": ()}, "non-empty"),
        ({"d_model": []}, "non-empty tuple"),
        ({"top_k": (1, 4), "num_experts": (2, 3)}, "top_k choice 4 exceeds"),
        ({"d_model": (30,)}, "divisible"),
        ({"bits": (16,)}, "bits"),
        ({"sparsity": (1.0,)}, "sparsity"),
        ({"low_rank_ratio": (0.0,)}, "low_rank_ratio"),
        ({"num_experts": (0, 2)}, ">= 1"),
        ({"ffn_dim": (32, 32)}, "duplicate"),
    ],
)
def test_empty_or_contradictory_space(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)


def test_candidate_builds_configs_and_clamps_top_k() -> None:
    space = SearchSpace(num_experts=(1, 2), top_k=(1, 2))
    candidate = space.candidate({**PARAMS, "num_experts": 1})
    assert candidate.model.moe.top_k == 1  # clamped to the sampled expert count
    assert candidate.model.block_size == space.base.block_size
    full = space.candidate(PARAMS)
    assert (full.model.moe.top_k, full.model.moe_every, full.compression) == (
        2,
        2,
        Compression(8, 0.3, 0.5),
    )
    assert len(full.features()) == len(FEATURE_NAMES)
    assert full.features()[FEATURE_NAMES.index("moe_layers")] == 1  # layer 1 of 2
    with pytest.raises(ValueError, match="missing"):
        space.candidate({"n_layer": 1})


@pytest.mark.parametrize("n_layer", [1, 2, 3])
@pytest.mark.parametrize("moe_every", [1, 2, 3])
def test_every_candidate_has_a_moe_layer(n_layer: int, moe_every: int) -> None:
    space = SearchSpace(n_layer=(1, 2, 3), moe_every=(1, 2, 3))
    model = space.candidate({**PARAMS, "n_layer": n_layer, "moe_every": moe_every}).model
    moe_layers = [i for i in range(model.n_layer) if model.is_moe(i)]
    assert moe_layers, (n_layer, moe_every)
    if moe_every <= n_layer:  # unchanged where it already gives a PiMoE layer
        assert model.moe_every == moe_every


def test_base_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SearchSpace(d_model=(32,), base=LMConfig(block_size=64, n_head=3, d_model=30))
