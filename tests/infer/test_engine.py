import warnings

import pytest
import torch
from torch import nn

from pimoe.infer import InferenceCache
from pimoe.infer.engine import InferenceConfig, InferenceEngine
from pimoe.moe import PiMoE
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM


class Counting(nn.Module):
    """Wraps a module and counts its forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args)


class Spy(nn.Module):
    """Records the grad mode, autocast state and inputs it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen: dict[str, object] = {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen = {
            "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "training": self.training,
            "x": x,
        }
        return self.lin(x) + y


def _moe() -> PiMoE:
    return PiMoE(16, num_experts=4, top_k=2, ffn_dim=32)


def test_fp32_equals_eager_exactly() -> None:
    layer = _moe()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = layer(x)
    out = InferenceEngine().infer(layer, x)
    assert torch.equal(out, expected)
    assert not layer.training and layer.last_stats is not None


def test_lm_and_tuple_inputs() -> None:
    lm = PiMoELM(
        LMConfig(
            n_layer=2, d_model=32, n_head=2, block_size=16, moe=MoEConfig(num_experts=4, ffn_dim=32)
        )
    )
    idx = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        expected = lm(idx).logits
    assert torch.equal(InferenceEngine().infer(lm, (idx,)).logits, expected)
    spy = Spy()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    out = InferenceEngine().infer(spy, [x, y])
    assert torch.equal(out, spy.lin(x).detach() + y)
    assert spy.seen["inference"] and not spy.seen["autocast"] and not spy.seen["training"]


def test_bfloat16_autocast_close_to_fp32() -> None:
    layer = _moe()
    x = torch.randn(4, 8, 16)
    expected = InferenceEngine().infer(layer, x)
    out = InferenceEngine(InferenceConfig(dtype="bfloat16")).infer(layer, x)
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    assert not torch.equal(out.float(), expected)  # it did run in bfloat16
    spy = Spy()
    InferenceEngine(InferenceConfig(dtype="bfloat16")).infer(spy, (x[0, :, :4], x[0, :, :4]))
    assert spy.seen["autocast"]


def test_compile_matches_eager_on_pimoe() -> None:
    layer = _moe()
    x = torch.randn(2, 6, 16)
    expected = InferenceEngine().infer(layer, x)
    engine = InferenceEngine(InferenceConfig(compile=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback allowed here
        assert engine.compile_status(layer) == "off"
        out = engine.infer(layer, x)
        again = engine.infer(layer, x)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out, again)
    assert engine.compile_status(layer) == "compiled"
    assert engine.stats.compiled == 1 and engine.stats.compile_fallbacks == 0


def test_compile_unavailable_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    layer, x = _moe(), torch.randn(3, 16)
    engine = InferenceEngine(InferenceConfig(compile=True))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = engine.infer(layer, x)
    with torch.no_grad():
        assert torch.equal(out, layer(x))
    assert engine.compile_status(layer) == "eager-fallback"
    assert (
        engine.stats.compile_fallbacks == 1
        and "no compiler here" in engine.stats.last_compile_error
    )


def test_compile_failing_at_first_call_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def lazy_broken(model: nn.Module, **kwargs: object):
        def run(*args: torch.Tensor) -> None:
            raise RuntimeError("backend crashed")

        return run

    monkeypatch.setattr(torch, "compile", lazy_broken)
    layer, x = _moe(), torch.randn(3, 16)
    engine = InferenceEngine(InferenceConfig(compile=True))
    with pytest.warns(RuntimeWarning, match="backend crashed"):
        engine.infer(layer, x)
    assert engine.compile_status(layer) == "eager-fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then plain eager
        with torch.no_grad():
            assert torch.equal(engine.infer(layer, x), layer(x))


def test_input_error_is_not_a_compile_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    engine = InferenceEngine(InferenceConfig(compile=True))
    layer = _moe()
    with pytest.raises(ValueError, match="expected input"):
        engine.infer(layer, torch.randn(3, 5))
    assert engine.compile_status(layer) == "pending"


def test_cache_hit_skips_the_model() -> None:
    model = Counting(_moe())
    engine = InferenceEngine(InferenceConfig(cache_size=8, cache_namespace="moe@1"))
    x = torch.randn(2, 3, 16)
    first = engine.infer(model, x)
    second = engine.infer(model, x.clone())
    assert model.calls == 1 and torch.equal(first, second)
    engine.infer(model, x + 1)
    assert model.calls == 2
    s = engine.stats
    assert (s.calls, s.model_calls, s.cache_hits) == (3, 2, 1) and s.mean_latency_s > 0
    assert engine.cache.stats.hits == 1


def test_shared_cache_separates_models_and_dtypes() -> None:
    cache = InferenceCache(max_size=8)
    a, b = Counting(nn.Linear(4, 4)), Counting(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    engine = InferenceEngine(InferenceConfig(cache=cache))
    engine.infer(a, x, namespace="a")
    with pytest.raises(ValueError, match="namespace 'a'"):
        engine.infer(b, x, namespace="a")
    engine.infer(b, x, namespace="b")
    InferenceEngine(InferenceConfig(cache=cache, dtype="bfloat16")).infer(a, x, namespace="a")
    assert (a.calls, b.calls) == (2, 1)
    engine.release(a)  # drops compiled state only: the cache still holds a's outputs under "a"
    with pytest.raises(ValueError, match="namespace 'a'"):
        engine.infer(b, x, namespace="a")


def test_channels_last_inputs_and_model() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = conv(x)
    seen: list[torch.Tensor] = []
    conv[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = InferenceEngine(InferenceConfig(channels_last=True)).infer(conv, x)
    torch.testing.assert_close(out, expected)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last
    )
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_raise_clear_errors() -> None:
    engine, layer = InferenceEngine(InferenceConfig(check_finite=True)), _moe()
    with pytest.raises(ValueError, match="empty"):
        engine.infer(layer, ())
    with pytest.raises(TypeError, match="input 0 is a list"):
        engine.infer(layer, ([1.0] * 16,))
    with pytest.raises(TypeError, match="tensor or a tuple"):
        engine.infer(layer, {"x": torch.randn(2, 16)})
    with pytest.raises(ValueError, match="input 0 is on meta"):
        engine.infer(layer, torch.empty(2, 16, device="meta"))
    with pytest.raises(ValueError, match="NaN or inf"):
        engine.infer(layer, torch.full((2, 16), float("nan")))
    with pytest.raises(TypeError, match="nn.Module"):
        engine.infer(lambda x: x, torch.randn(2, 16))
    with pytest.raises(ValueError, match="model tensor"):
        engine.infer(nn.Linear(16, 16, device="meta"), torch.randn(2, 16))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "dtype must be"),
        ({"device": "nonsense"}, "not a torch device"),
        ({"num_threads": 0}, "num_threads"),
        ({"cache_size": -1}, "cache_size"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InferenceConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        InferenceConfig(device="cuda")


def test_float16_on_cpu_follows_torch_support() -> None:
    try:
        engine = InferenceEngine(InferenceConfig(dtype="float16"))
    except ValueError as exc:  # a torch whose CPU autocast has no float16
        assert "bfloat16" in str(exc)
        return
    out = engine.infer(nn.Linear(4, 4), torch.randn(2, 4))
    assert out.dtype == torch.float16
