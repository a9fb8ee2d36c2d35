"""pack_experts_ on transformers MoE models running experts_implementation="pimoe": the same
logits as unpacked on every bias-free family (activations given as Python functions run between
two packed passes), the packed kernel really run, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pimoe.hf import FAMILIES, build_tiny
from pimoe.moe import grouped, pack_experts_, unpack_experts_

pytest.importorskip("transformers")
BIASED = {"gpt_oss"}  # experts with biases: the packed kernel runs bias-free experts


def _logits(model: torch.nn.Module, ids: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - BIASED))
def test_packed_hf_model_equals_unpacked(
    two_threads: None, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = grouped.packed_rows_mm

    def spy(a: Tensor, packed: list[Tensor], splits: list[int]) -> Tensor:
        calls.append(len(packed))
        return real(a, packed, splits)

    monkeypatch.setattr(grouped, "packed_rows_mm", spy)
    model = build_tiny(family)
    model.set_experts_implementation("pimoe")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    want = _logits(model, ids)
    banks = pack_experts_(model)
    assert banks == model.config.num_hidden_layers - getattr(
        model.config, "first_k_dense_replace", 0
    )
    got = _logits(model, ids)
    assert len(calls) == 2 * banks  # the input and output projections of every layer, packed
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert unpack_experts_(model) == banks
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-6, rtol=1e-6)
    assert len(calls) == 2 * banks


def test_refusals(two_threads: None) -> None:
    model = build_tiny("mixtral")
    model.set_experts_implementation("eager")
    with pytest.raises(ValueError, match="experts_implementation='eager'"):
        pack_experts_(model)
    biased = build_tiny("gpt_oss")
    biased.set_experts_implementation("pimoe")
    with pytest.raises(ValueError, match="biases"):
        pack_experts_(biased)
