"""Expert weights prepacked by oneDNN (pimoe.moe.pack_experts_): the unpacked layer's outputs on
both inference paths and in bf16, the packed kernel really run, never stale after the weights
change, training untouched, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from pimoe.moe import MoEConfig, PiMoE, add_lora, grouped, pack_experts_, threaded, unpack_experts_
from pimoe.moe import prepack as prepack_module

D = 32


def _layer(experts: int = 8, top_k: int = 2, **kw: object) -> PiMoE:
    torch.manual_seed(0)
    return PiMoE(D, MoEConfig(num_experts=experts, top_k=top_k, ffn_dim=48, **kw))  # type: ignore[arg-type]


def _x(tokens: int = 40, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, tokens // 2, D, generator=torch.Generator().manual_seed(1)).to(dtype)


def _out(layer: PiMoE, x: Tensor) -> Tensor:
    with torch.inference_mode():
        out = layer(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def packed_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the packed kernel entry points called (still running them)."""
    calls: list[str] = []
    for name in ("packed_ffn_forward", "packed_expert_major_forward"):
        real = getattr(grouped, name)

        def spy(*args: object, _real: object = real, _name: str = name) -> Tensor:
            calls.append(_name)
            return _real(*args)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(grouped, name, spy)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_layer_is_the_unpacked_layer(
    two_threads: None, packed_calls: list[str], threads: int
) -> None:
    torch.set_num_threads(threads)
    layer = _layer(experts=16, top_k=4)
    packed = copy.deepcopy(layer)
    assert pack_experts_(packed) == 1
    x = _x()
    want = _out(layer, x)
    got = _out(packed, x)
    assert packed_calls == ["packed_ffn_forward"]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert unpack_experts_(packed) == 1 and unpack_experts_(packed) == 0
    torch.testing.assert_close(_out(packed, x), want, atol=2e-5, rtol=1e-4)
    assert packed_calls == ["packed_ffn_forward"]  # unpacked: not called again


def test_packed_expert_major_path(
    two_threads: None, packed_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grouped, "CHUNK_HIDDEN_BYTES", 96 * 4 * 3)  # 3 rows per chunk
    monkeypatch.setattr("pimoe.moe.experts.EXPERT_MAJOR_MIN_BYTES", 0)
    layer = _layer()
    packed = copy.deepcopy(layer)
    pack_experts_(packed)
    x = _x(64)
    torch.testing.assert_close(_out(packed, x), _out(layer, x), atol=2e-5, rtol=1e-4)
    assert packed_calls == ["packed_expert_major_forward"]


def test_bfloat16_weights(two_threads: None, packed_calls: list[str]) -> None:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN runs no bfloat16 matmul on this CPU")
    layer = _layer().to(torch.bfloat16)
    packed = copy.deepcopy(layer)
    pack_experts_(packed)
    x = _x(dtype=torch.bfloat16)
    want = _out(layer, x).float()
    got = _out(packed, x).float()
    assert packed_calls == ["packed_ffn_forward"]
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_repacked_after_the_weights_change(two_threads: None, packed_calls: list[str]) -> None:
    layer = _layer()
    pack_experts_(layer)
    x = _x()
    before = _out(layer, x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    out = layer(x)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    opt.step()  # in place: the packed copies are now stale
    after = _out(layer, x)
    reference = copy.deepcopy(layer)
    unpack_experts_(reference)
    torch.testing.assert_close(after, _out(reference, x), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)
    with torch.no_grad():
        layer.experts.w_out.data = layer.experts.w_out.data * 2  # new data, no version bump
    doubled = copy.deepcopy(reference)
    with torch.no_grad():
        doubled.experts.w_out.mul_(2)
    torch.testing.assert_close(_out(layer, x), _out(doubled, x), atol=4e-5, rtol=1e-4)
    assert packed_calls.count("packed_ffn_forward") == 3


def test_training_runs_the_unpacked_kernel(two_threads: None, packed_calls: list[str]) -> None:
    layer = _layer()
    packed = copy.deepcopy(layer)
    pack_experts_(packed)
    x = _x()
    grads = []
    for model in (layer, packed):
        out = model(x)
        (out[0] if isinstance(out, tuple) else out).square().sum().backward()
        grads.append(model.experts.w_in.grad)
    assert packed_calls == []
    assert torch.equal(grads[0], grads[1])


def test_other_dtype_or_device_falls_back(two_threads: None, packed_calls: list[str]) -> None:
    layer = _layer()
    pack_experts_(layer)
    reference = copy.deepcopy(layer).double()
    unpack_experts_(reference)
    layer.double()  # float64: oneDNN packs no float64 weights; the layer keeps working
    x = _x(dtype=torch.float64)
    torch.testing.assert_close(_out(layer, x), _out(reference, x))
    assert packed_calls == []


def test_refusals(two_threads: None) -> None:
    with pytest.raises(ValueError, match="holds no expert bank"):
        pack_experts_(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="biases"):
        pack_experts_(_layer(bias=True))
    with pytest.raises(ValueError, match="float64"):
        pack_experts_(_layer().double())
    with pytest.raises(ValueError, match="rows_hint"):
        pack_experts_(_layer(), rows_hint=0)
    adapted = _layer()
    add_lora(adapted)
    with pytest.raises(ValueError, match="LoRA"):
        pack_experts_(adapted)


def test_no_kernel_no_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepack_module, "threaded_kernel", lambda: None)
    with pytest.raises(ValueError, match="threaded experts kernel is not available"):
        pack_experts_(_layer())


class _TransposedBank(torch.nn.Module):
    """An expert bank storing its weights transposed (``[E, D, F_in]``, ``[E, F, D]``), run
    through views, as transformers' GPT-OSS experts are."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.w_in_t = torch.nn.Parameter(torch.randn(4, D, 2 * 24, generator=gen) / 6)
        self.w_out_t = torch.nn.Parameter(torch.randn(4, 24, D, generator=gen) / 5)

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.w_in_t.transpose(1, 2), self.w_out_t.transpose(1, 2)  # fresh views per call

    def forward(self, x: Tensor, splits: list[int]) -> Tensor:
        w_in, w_out = self.weights()
        return grouped.grouped_ffn(x, w_in, None, w_out, None, splits, threaded.swiglu)


def _find_transposed(module: torch.nn.Module) -> tuple[Tensor, Tensor] | None:
    return module.weights() if isinstance(module, _TransposedBank) else None


def test_register_packable_with_weights_seen_through_views(
    two_threads: None, packed_calls: list[str]
) -> None:
    bank, splits = _TransposedBank(), [5, 0, 9, 3]
    x = torch.randn(sum(splits), D, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = bank(x, splits)
    with pytest.raises(ValueError, match="holds no expert bank"):
        pack_experts_(bank)
    prepack_module.register_packable(_find_transposed)
    try:
        assert pack_experts_(bank) == 1
        with torch.inference_mode():
            got = bank(x, splits)
        assert packed_calls == ["packed_ffn_forward"]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert unpack_experts_(bank) == 1
    finally:
        prepack_module._FINDERS.remove(_find_transposed)
