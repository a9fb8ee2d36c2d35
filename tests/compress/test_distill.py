import pytest
import torch
from torch import nn

from pimoe.compress.distill import DistillResult, distill, soft_loss
from pimoe.compress.prune import magnitude_prune


def _mlp(seed: int, hidden: int = 64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, 10))


def _batches(seed: int, n: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 16, generator=g) for _ in range(n)]


@torch.no_grad()
def _kl(teacher: nn.Module, student: nn.Module, data: list[torch.Tensor]) -> float:
    return sum(float(soft_loss(student(x), teacher(x), "kl", 1.0)) for x in data) / len(data)


def test_soft_loss_zero_for_identical_outputs_and_scaled_by_t_squared():
    a, b = torch.randn(8, 10), torch.randn(8, 10)
    assert float(soft_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_loss(a, a.clone(), "cosine")) == pytest.approx(0.0, abs=1e-6)
    raw = torch.nn.functional.kl_div(
        torch.log_softmax(a / 4, -1),
        torch.log_softmax(b / 4, -1),
        reduction="batchmean",
        log_target=True,
    )
    assert float(soft_loss(a, b, "kl", 4.0)) == pytest.approx(float(raw) * 16, rel=1e-5)
    with pytest.raises(ValueError):
        soft_loss(a, b[:, :5])


def test_distill_reduces_kl_of_random_student():
    teacher, student = _mlp(0).eval(), _mlp(1)
    train, val = _batches(2, 20), _batches(3, 4)
    before = _kl(teacher, student, val)
    result = distill(teacher, student, train, epochs=5, lr=3e-3)
    after = _kl(teacher, student, val)
    assert isinstance(result, DistillResult)
    assert result.steps == 100 and len(result.losses) == 100
    assert after < 0.3 * before
    assert not result.stopped_early and result.best_val_loss is None


def test_distill_repairs_pruned_student_and_keeps_it_sparse():
    teacher = _mlp(0, hidden=256).eval()
    student = _mlp(0, hidden=256)
    magnitude_prune(student, 0.5)
    zeros = [(m.weight == 0).clone() for m in student if isinstance(m, nn.Linear)]
    val = _batches(3, 4)
    before = _kl(teacher, student, val)
    distill(teacher, student, _batches(2, 20), epochs=5, lr=3e-3, preserve_sparsity=True)
    assert _kl(teacher, student, val) < 0.3 * before
    for mask, m in zip(zeros, [m for m in student if isinstance(m, nn.Linear)]):
        assert bool((m.weight[mask] == 0).all())


def test_early_stopping_on_plateau():
    teacher, student = _mlp(0), _mlp(1)
    result = distill(
        teacher,
        student,
        _batches(2, 10),
        epochs=3,
        lr=0.0,
        val_data=_batches(3, 2),
        eval_every=1,
        patience=3,
    )
    assert result.stopped_early
    assert result.steps == 4 and len(result.val_losses) == 4
    assert result.best_val_loss == pytest.approx(result.val_losses[0])


def test_early_stopping_restores_best_weights_and_steps_limit():
    teacher, student = _mlp(0), _mlp(1)
    result = distill(
        teacher, student, _batches(2, 10), epochs=5, steps=7, lr=1e-2, val_data=_batches(3, 2)
    )
    assert result.steps == 7 and len(result.val_losses) == 0
    result = distill(teacher, student, _batches(2, 10), epochs=2, lr=1e-2, val_data=_batches(3, 2))
    assert len(result.val_losses) == 2
    with torch.no_grad():
        val = sum(float(soft_loss(student(x), teacher(x))) for x in _batches(3, 2)) / 2
    assert val == pytest.approx(result.best_val_loss, rel=1e-5)


def test_hidden_state_matching_tuple_batches_and_labels():
    teacher, student = _mlp(0).eval(), _mlp(1)
    x = _batches(2, 5)
    data = [(xb, teacher(xb).argmax(-1)) for xb in x]
    result = distill(
        teacher,
        student,
        data,
        epochs=2,
        alpha=0.5,
        with_labels=True,
        hidden_pairs=[("0", "0")],
        hidden_mse_weight=1.0,
        loss="mse",
    )
    assert result.losses[-1] < result.losses[0]
    with pytest.raises(ValueError, match="no module"):
        distill(teacher, student, x, hidden_pairs=[("nope", "0")], hidden_mse_weight=1.0)
    with pytest.raises(ValueError):
        distill(teacher, student, x, patience=2)
    with pytest.raises(ValueError):
        distill(teacher, student, x, loss="huber")  # type: ignore[arg-type]


def test_output_fn_reads_logits_attribute():
    class Out:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Out:
            return Out(self.inner(x))

    teacher, student = Wrap(_mlp(0)), Wrap(_mlp(1))
    result = distill(teacher, student, _batches(2, 10), epochs=2, lr=3e-3)
    assert result.losses[-1] < result.losses[0]
