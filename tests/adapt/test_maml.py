import pytest
import torch
from torch import nn

from pimoe.adapt import MAML, Reptile, SinusoidTasks, Task, run, sgd_steps, trainable_params
from pimoe.moe import PiMoE


def _mlp(seed: int = 0, width: int = 16, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).to(dtype)


def _meta_grad(model: nn.Module, tasks: Task, **kwargs) -> torch.Tensor:
    model.zero_grad()
    MAML(model, **kwargs).meta_loss(tasks).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_over_tasks_gives_the_loop_meta_gradient(first_order):
    tasks = SinusoidTasks(seed=1).sample(4, 5, 7)
    loop = _meta_grad(_mlp(), tasks, inner_steps=2, first_order=first_order)
    vect = _meta_grad(_mlp(), tasks, inner_steps=2, first_order=first_order, vectorize=True)
    torch.testing.assert_close(vect, loop, rtol=1e-5, atol=1e-6)


def test_second_order_meta_gradient_matches_finite_differences():
    model = _mlp(width=4, dtype=torch.float64)
    tasks = SinusoidTasks(seed=2).sample(2, 5, 5)
    tasks = Task(*(t.double() for t in tasks))
    maml = MAML(model, inner_lr=0.1, inner_steps=2)
    analytic = _meta_grad(model, tasks, inner_lr=0.1, inner_steps=2)
    weight = model[0].weight
    numeric = []
    for i in range(weight.numel()):
        values = []
        for shift in (1e-6, -2e-6, 1e-6):
            with torch.no_grad():
                weight.view(-1)[i] += shift
            values.append(float(maml.meta_loss(tasks).detach()))
        numeric.append((values[0] - values[1]) / 2e-6)
    torch.testing.assert_close(
        analytic[: weight.numel()], torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    first = _meta_grad(model, tasks, inner_lr=0.1, inner_steps=2, first_order=True)
    assert not torch.allclose(first, analytic, rtol=1e-3)  # FOMAML drops the second-order term


def _post_adaptation_mse(model: nn.Module, tasks: Task, steps: int = 1, lr: float = 0.01) -> float:
    losses = []
    for i in range(tasks.support_x.shape[0]):
        t = tasks.task(i)
        fast = sgd_steps(
            model,
            trainable_params(model),
            t.support_x,
            t.support_y,
            nn.functional.mse_loss,
            steps,
            lr,
        )
        losses.append(
            float(nn.functional.mse_loss(run(model, fast, t.query_x), t.query_y).detach())
        )
    return sum(losses) / len(losses)


def test_maml_meta_training_lowers_post_adaptation_error_on_new_sinusoids():
    model = _mlp(width=32)
    test = SinusoidTasks(seed=99).sample(50, 10, 50)
    before = _post_adaptation_mse(model, test)
    maml = MAML(model, inner_lr=0.01, outer_lr=1e-2, vectorize=True)
    source = SinusoidTasks(seed=0)
    for _ in range(150):
        maml.step(source.sample(10, 10, 10))
    after = _post_adaptation_mse(model, test)
    assert after < 0.7 * before, (before, after)
    assert after < _post_adaptation_mse(
        model, test, steps=0
    )  # the one step from the learned init helps


def test_reptile_meta_training_lowers_post_adaptation_error():
    model = _mlp(width=32)
    test = SinusoidTasks(seed=99).sample(50, 10, 50)
    before = _post_adaptation_mse(model, test, steps=5, lr=0.02)
    reptile = Reptile(model, inner_lr=0.05, inner_steps=5, epsilon=0.5)
    source = SinusoidTasks(seed=0)
    for _ in range(80):
        reptile.step(source.sample(3, 10, 10))
    after = _post_adaptation_mse(model, test, steps=5, lr=0.02)
    assert after < 0.6 * before, (before, after)


def _moe_model(experts: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layer = (
        PiMoE(
            8,
            top_k=2,
            experts=[nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(4)],
        )
        if experts
        else PiMoE(8, num_experts=4, top_k=2, ffn_dim=8)
    )
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), layer, nn.Linear(8, 1))


def test_maml_runs_through_a_pimoe_layer():
    tasks = SinusoidTasks(seed=3).sample(3, 5, 5)
    second = _moe_model(experts=True)  # plain expert modules: twice differentiable
    grads = _meta_grad(second, tasks, inner_steps=2)
    assert torch.isfinite(grads).all()
    assert second[2].router.gate.weight.grad.abs().sum() > 0
    first = _moe_model(experts=False)  # built-in fused experts: once differentiable, so FOMAML
    assert torch.isfinite(_meta_grad(first, tasks, first_order=True)).all()
    assert first[2].router.gate.weight.grad.abs().sum() > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        MAML(_mlp(), inner_steps=0)
    with pytest.raises(ValueError):
        MAML(_mlp(), loss="hinge")
    with pytest.raises(ValueError):
        Reptile(_mlp(), epsilon=2.0)
    tasks = SinusoidTasks(seed=0).sample(3, 5, 5)
    with pytest.raises(ValueError, match="leading dimension"):
        MAML(_mlp()).meta_loss(
            Task(tasks.support_x, tasks.support_y[:2], tasks.query_x, tasks.query_y)
        )
    with pytest.raises(ValueError):
        SinusoidTasks(amplitude=(5.0, 0.1))
