"""``LMConfig`` refuses wrongly typed fields by name, and ``parameter_bound`` is an upper bound
of the parameter count that a loader can check before building anything."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimoe.moe.config import MoEConfig
from pimoe.moe.lm_config import LMConfig
from pimoe.moe.model import PiMoELM


@settings(max_examples=60, deadline=None)
@given(
    n_layer=st.integers(1, 3),
    heads=st.integers(1, 4),
    head_dim=st.integers(2, 8),
    experts=st.integers(1, 6),
    width=st.integers(1, 24),
    shared=st.integers(0, 2),
    shared_width=st.one_of(st.none(), st.integers(1, 40)),
    moe_every=st.integers(0, 2),
    activation=st.sampled_from(["swiglu", "gelu"]),
    bias=st.booleans(),
    shared_gate=st.booleans(),
)
def test_parameter_bound_holds_and_is_tight(
    n_layer,
    heads,
    head_dim,
    experts,
    width,
    shared,
    shared_width,
    moe_every,
    activation,
    bias,
    shared_gate,
) -> None:  # type: ignore[no-untyped-def]
    moe = MoEConfig(
        num_experts=experts, top_k=1, ffn_dim=width, shared_experts=shared,
        shared_ffn_dim=shared_width, activation=activation, bias=bias, shared_gate=shared_gate,
    )  # fmt: skip
    config = LMConfig(
        vocab_size=50, block_size=16, n_layer=n_layer, n_head=heads, d_model=heads * head_dim,
        moe_every=moe_every, moe=moe,
    )  # fmt: skip
    actual = sum(p.numel() for p in PiMoELM(config).parameters())
    assert actual <= config.parameter_bound() <= 3 * actual


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("n_layer", True, TypeError),
        ("d_model", "64", TypeError),
        ("block_size", 128.0, TypeError),
        ("dense_ffn_dim", 0, ValueError),
        ("dropout", "0.1", TypeError),
        ("dropout", 1.0, ValueError),
    ],
)
def test_wrong_field_types_are_refused_by_name(field: str, value: object, error: type) -> None:
    with pytest.raises(error, match=field):
        LMConfig.from_dict({field: value})
