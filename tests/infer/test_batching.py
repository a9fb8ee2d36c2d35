import threading
import time
from collections import namedtuple
from concurrent.futures import CancelledError
from functools import partial

import pytest
import torch
from torch import nn

from pimoe.infer.batching import MicroBatcher, lengths_to_mask
from pimoe.infer.engine import InferenceEngine
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM

NAN = float("nan")


def _per_token() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def _causal(x: torch.Tensor) -> torch.Tensor:
    """[B, L, D] -> [B, L, D]: position t sees positions <= t only."""
    return torch.cumsum(x, dim=1) * 0.5


def _masked_mean(batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, Lmax, D], lengths [B] -> [B, D]: mean over the real positions only."""
    mask = lengths_to_mask(lengths, batch.shape[1])[..., None]
    return torch.where(mask, batch, 0.0).sum(1) / lengths[:, None]


def _requests(n: int, d: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(int(torch.randint(1, 12, (), generator=g)), d, generator=g) for _ in range(n)
    ]


def _submit_all(batcher: MicroBatcher, xs: list[torch.Tensor]) -> list[object]:
    futures = [batcher.submit(x) for x in xs]
    return [f.result(timeout=10) for f in futures]


@pytest.mark.parametrize("kind", ["per_token", "causal", "masked_mean"])
def test_padding_does_not_leak(kind: str) -> None:
    model = _per_token().eval()
    fn = {"per_token": model, "causal": _causal, "masked_mean": _masked_mean}[kind]
    xs = _requests(10)
    with torch.no_grad():
        alone = [
            fn(x[None], torch.tensor([len(x)]))[0] if kind == "masked_mean" else fn(x[None])[0]
            for x in xs
        ]
    # NaN padding: any leak into a real position would show up as NaN
    with MicroBatcher(
        fn, max_batch_size=16, max_wait_ms=200, pad_value=NAN, seq_output=kind != "masked_mean"
    ) as b:
        got = _submit_all(b, xs)
    assert b.stats.mean_batch_size > 1
    for g, a, x in zip(got, alone, xs):
        if kind != "masked_mean":
            assert g.shape[0] == len(x)
        torch.testing.assert_close(g, a)


def test_causal_lm_with_token_ids_through_the_engine() -> None:
    lm = PiMoELM(
        LMConfig(
            n_layer=2, d_model=32, n_head=2, block_size=16, moe=MoEConfig(num_experts=4, ffn_dim=32)
        )
    )
    engine = InferenceEngine()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (3, 9, 5, 9, 1, 7)]
    alone = [engine.infer(lm, p[None]).logits[0] for p in prompts]
    with MicroBatcher(
        lambda idx: engine.infer(lm, idx).logits, max_batch_size=8, max_wait_ms=200
    ) as b:
        got = _submit_all(b, prompts)
    assert b.stats.batches < len(prompts)
    for g_, a, p in zip(got, alone, prompts):
        assert g_.shape == (len(p), 256)
        torch.testing.assert_close(g_, a)


def test_fixed_shapes_are_stacked_and_rows_returned() -> None:
    seen: list[tuple[int, ...]] = []

    def fn(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(tuple(batch.shape))
        return {"sum": batch.sum(dim=(1, 2)), "same": batch * 2}

    xs = [torch.randn(3, 4) for _ in range(5)]
    with MicroBatcher(fn, max_wait_ms=200) as b:
        got = _submit_all(b, xs)
    for g, x in zip(got, xs):
        torch.testing.assert_close(g["sum"], x.sum())
        assert torch.equal(g["same"], x * 2)
    assert all(s[1:] == (3, 4) for s in seen)


def test_namedtuple_outputs_are_split() -> None:
    Pair = namedtuple("Pair", "doubled shifted")
    with MicroBatcher(lambda batch: Pair(batch * 2, batch + 1), max_wait_ms=200) as b:
        short, long = _submit_all(b, [torch.ones(1, 2), torch.ones(3, 2)])
    assert (
        isinstance(short, Pair) and short.doubled.shape == (1, 2) and long.shifted.shape == (3, 2)
    )


def test_incompatible_requests_run_in_separate_groups() -> None:
    xs = [torch.randn(2, 4), torch.randn(2, 5), torch.randn(3, 4).double()]
    with MicroBatcher(lambda batch: batch + 1, max_wait_ms=200) as b:
        got = _submit_all(b, xs)
    for g, x in zip(got, xs):
        assert torch.equal(g, x + 1) and g.dtype == x.dtype


def test_many_threads_get_their_own_results_and_batches_coalesce() -> None:
    model = _per_token().eval()

    def slow(batch: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)  # a forward that takes time, so requests queue up behind it
        return model(batch)

    xs = _requests(64, seed=3)
    results: list[torch.Tensor | None] = [None] * len(xs)
    start = threading.Barrier(16)
    with MicroBatcher(slow, max_batch_size=8, max_wait_ms=20) as b:

        def client(k: int) -> None:
            start.wait()
            for i in range(k, len(xs), 16):
                results[i] = b(xs[i], timeout=10)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with torch.no_grad():
        for r, x in zip(results, xs):
            torch.testing.assert_close(r, model(x[None])[0])
    s = b.stats
    assert s.requests == 64 and sum(s.batch_sizes) == 64
    assert s.mean_batch_size > 1 and max(s.batch_sizes) <= 8
    assert sum(n * c for n, c in s.batch_size_counts.items()) == 64


def test_max_batch_size_is_respected() -> None:
    sizes: list[int] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return batch

    with MicroBatcher(fn, max_batch_size=3, max_wait_ms=200) as b:
        futures = [b.submit(torch.full((2,), float(i))) for i in range(10)]
        got = [f.result(timeout=10) for f in futures]
    assert max(sizes) == 3 and sum(sizes) == 10
    assert [int(g[0]) for g in got] == list(range(10))


def test_exceptions_reach_every_future_of_the_batch_only() -> None:
    def fn(batch: torch.Tensor) -> torch.Tensor:
        if (batch < 0).any():
            raise RuntimeError("negative input")
        return batch

    with MicroBatcher(fn, max_batch_size=4, max_wait_ms=200) as b:
        bad = [
            b.submit(torch.tensor([1.0])),
            b.submit(torch.tensor([-1.0])),
            b.submit(torch.tensor([2.0])),
        ]
        for f in bad:
            with pytest.raises(RuntimeError, match="negative input"):
                f.result(timeout=10)
        assert b(torch.tensor([3.0]), timeout=10).item() == 3.0  # the worker survived
    assert b.stats.errors == 1


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()])
def test_a_non_exception_from_fn_fails_pending_requests_and_refuses_new_ones(
    error: BaseException,
) -> None:
    started, release = threading.Event(), threading.Event()

    def fn(batch: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(10)
        raise error

    b = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0)
    running = b.submit(torch.tensor([1.0]))
    assert started.wait(10)
    queued = [b.submit(torch.tensor([float(i)])) for i in range(3)]  # behind the running batch
    release.set()
    for future in (running, *queued):
        with pytest.raises(
            RuntimeError, match=rf"worker stopped: fn raised {type(error).__name__}"
        ) as info:
            future.result(timeout=10)  # before: the worker died and these never completed
        assert info.value.__cause__ is error
    with pytest.raises(RuntimeError, match="refuses requests"):
        b.submit(torch.tensor([1.0]))
    b.close(timeout=10)
    assert not b._worker.is_alive() and b.stats.errors == 1


def test_wrong_output_shapes_are_reported() -> None:
    with MicroBatcher(
        lambda batch: batch.sum(dim=1), max_wait_ms=200
    ) as b:  # pooled, but seq_output=True
        f1, f2 = b.submit(torch.randn(2, 3)), b.submit(torch.randn(4, 3))
        with pytest.raises(ValueError, match="seq_output=False"):
            f1.result(timeout=10)
        with pytest.raises(ValueError, match="seq_output=False"):
            f2.result(timeout=10)
    with (
        MicroBatcher(lambda batch: batch.new_zeros(len(batch) + 1)) as b,
        pytest.raises(ValueError, match="one per request"),
    ):
        b(torch.randn(2), timeout=10)


def test_close_drains_or_cancels() -> None:
    gate = threading.Event()

    def fn(batch: torch.Tensor) -> torch.Tensor:
        gate.wait(10)
        return batch * 2

    b = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0)
    futures = [b.submit(torch.tensor([float(i)])) for i in range(4)]
    gate.set()
    b.close()
    assert [f.result(timeout=1).item() for f in futures] == [0.0, 2.0, 4.0, 6.0]
    assert not b._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(torch.tensor([1.0]))
    b.close()  # idempotent

    gate.clear()
    b = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0)
    first = b.submit(torch.tensor([1.0]))
    while not first.running():
        time.sleep(0.001)
    queued = [b.submit(torch.tensor([2.0])) for _ in range(3)]
    closer = threading.Thread(target=partial(b.close, drain=False))
    closer.start()
    closer.join(0.05)
    gate.set()
    closer.join(10)
    assert first.result(timeout=1).item() == 2.0  # the running batch completed
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(timeout=1)


def test_lengths_are_passed_by_signature_or_flag() -> None:
    got: dict[str, torch.Tensor] = {}

    def fn(batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        got["lengths"] = lengths
        return batch

    with MicroBatcher(fn, max_wait_ms=200) as b:
        futures = [b.submit(torch.ones(n, 2)) for n in (2, 5)]
        [f.result(timeout=10) for f in futures]
    assert got["lengths"].tolist() == [2, 5] and got["lengths"].dtype == torch.long
    with MicroBatcher(lambda batch, **kw: (batch, kw["lengths"]), pass_lengths=True) as b:
        _, lengths = b(torch.ones(3, 2), timeout=10)
        assert lengths.item() == 3
    assert lengths_to_mask(torch.tensor([1, 3]), 3).tolist() == [
        [True, False, False],
        [True, True, True],
    ]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda b: b, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(lambda b: b, max_wait_ms=-1)
    with MicroBatcher(lambda b: b) as b:
        with pytest.raises(TypeError, match="torch.Tensor"):
            b.submit([1, 2])
        with pytest.raises(ValueError, match="0-D"):
            b.submit(torch.tensor(1.0))
