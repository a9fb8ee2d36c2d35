"""Meta-learning and continual learning, measured: MAML vs a pretrained baseline on the MAML paper's
sinusoids, 5-way few-shot digits (ProtoNets, MAML, a raw-pixel nearest-class-mean reference) and
EWC / replay on digits 0-4 then 5-9.

Every number is a mean over held-out tasks with a 95% confidence interval (1.96 standard errors).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from tqdm import tqdm

from pimoe.adapt import (
    EWC, MAML, DigitsEpisodes, ProtoNet, ReplayBuffer, SinusoidTasks, Task, load_digits_tensors, run, sgd_steps,
    task_incremental_loss, train_task, trainable_params,
)
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text, save_png

# Finn et al. 2017, Fig. 3 (K=5, read from the chart; ANCHORS.md "Meta-learning").
PAPER_K5 = {"maml_1step": 0.7, "maml_from_4_steps": 0.3, "pretrained": "> 2"}
META_TRAIN, META_TEST = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


@dataclass
class MetaBenchConfig:
    """Sizes of every part (the paper's sinusoid setup except the number of meta-iterations)."""

    shots: list[int] = field(default_factory=lambda: [5, 10])
    sinusoid_iterations: int = 10_000
    meta_batch: int = 25
    inner_lr: float = 0.01
    eval_tasks: int = 600
    eval_points: int = 100
    max_steps: int = 10
    fewshot_episodes: int = 2000
    fewshot_eval: int = 600
    maml_digits_inner_lr: float = 0.5
    ewc_lambda: float = 1000.0
    ewc_epochs_b: int = 30
    replay_size: int = 500
    seed: int = 0


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% normal confidence interval."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def sinusoid_net() -> nn.Sequential:
    """The paper's regressor: 1 -> 40 -> 40 -> 1, ReLU."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def mse_curve(model: nn.Module, tasks: Task, max_steps: int, lr: float) -> list[tuple[float, float]]:
    """Query MSE (mean, CI) after 0..max_steps SGD steps on each task's support set."""
    per_step: list[list[float]] = [[] for _ in range(max_steps + 1)]
    for i in range(tasks.support_x.shape[0]):
        task = tasks.index(i)
        params = trainable_params(model)
        for step in range(max_steps + 1):
            with torch.no_grad():
                per_step[step].append(float(F.mse_loss(run(model, params, task.query_x), task.query_y)))
            params = sgd_steps(model, params, task.support_x, task.support_y, F.mse_loss, 1, lr)
    return [ci95(v) for v in per_step]


def sinusoid(cfg: MetaBenchConfig, k: int) -> dict:
    """MAML (second order, vmapped) and the pretrained-on-all-tasks baseline, trained for the same
    number of Adam steps; both adapted with SGD at ``inner_lr`` on K points of new sinusoids."""
    torch.manual_seed(cfg.seed)
    maml_net, base_net = sinusoid_net(), sinusoid_net()
    base_net.load_state_dict(maml_net.state_dict())
    maml = MAML(maml_net, inner_lr=cfg.inner_lr, vectorize=True)
    source = SinusoidTasks(seed=cfg.seed + 1)
    base_opt = torch.optim.Adam(base_net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in tqdm(range(cfg.sinusoid_iterations), desc=f"MAML sinusoid K={k}", leave=False):
        maml.step(source.sample(cfg.meta_batch, k, k))
    maml_s = time.perf_counter() - start
    for _ in tqdm(range(cfg.sinusoid_iterations), desc=f"pretrained K={k}", leave=False):
        x, y = source.sample_points(cfg.meta_batch * k)
        loss = F.mse_loss(base_net(x), y)
        base_opt.zero_grad()
        loss.backward()
        base_opt.step()
    test = SinusoidTasks(seed=cfg.seed + 1000).sample(cfg.eval_tasks, k, cfg.eval_points)
    return {
        "k": k,
        "maml": mse_curve(maml_net, test, cfg.max_steps, cfg.inner_lr),
        "pretrained": mse_curve(base_net, test, cfg.max_steps, cfg.inner_lr),
        "maml_step_ms": 1000 * maml_s / cfg.sinusoid_iterations,
    }


class ConvEncoder(nn.Module):
    """``x [M, 64]`` (8x8 digits) -> ``[M, 128]``: three 3x3 conv blocks, two 2x2 max-pools."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(3):
            blocks += [nn.Conv2d(1 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i:
                blocks.append(nn.MaxPool2d(2))
        self.net = nn.Sequential(*blocks, nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(-1, 1, 8, 8))


def episode_accuracy(predict: Callable[[Task], Tensor], episodes: list[Task]) -> tuple[float, float]:
    """Mean query accuracy (with CI) of ``predict(task) -> labels [Q]`` over episodes."""
    return ci95([float((predict(e) == e.query_y).float().mean()) for e in episodes])


def fewshot(cfg: MetaBenchConfig, shots: int, data: tuple[Tensor, Tensor]) -> dict:
    """5-way ``shots``-shot on meta-test digits 5-9 after episodic training on rotated digits 0-4."""
    torch.manual_seed(cfg.seed)
    train = DigitsEpisodes(META_TRAIN, 5, shots, 15, seed=cfg.seed, data=data, rotations=True)
    test = DigitsEpisodes(META_TEST, 5, shots, 15, seed=cfg.seed + 1, data=data)
    episodes = [test.sample() for _ in range(cfg.fewshot_eval)]
    pixels = ProtoNet(nn.Identity())
    result = {"pixel_nearest_mean": episode_accuracy(lambda e: pixels(*e[:3]).argmax(-1), episodes)}

    proto = ProtoNet(ConvEncoder())
    optimizer = torch.optim.Adam(proto.parameters(), lr=1e-3)
    for _ in tqdm(range(cfg.fewshot_episodes), desc=f"ProtoNet {shots}-shot", leave=False):
        loss = proto.loss(train.sample())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    proto.eval()
    with torch.no_grad():
        result["protonet"] = episode_accuracy(lambda e: proto(*e[:3]).argmax(-1), episodes)

    torch.manual_seed(cfg.seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    maml = MAML(net, inner_lr=cfg.maml_digits_inner_lr, inner_steps=5, loss="cross_entropy", vectorize=True)
    for _ in tqdm(range(cfg.fewshot_episodes // 4), desc=f"MAML {shots}-shot", leave=False):
        maml.step(train.sample_batch(4))

    def maml_predict(e: Task) -> Tensor:
        params = maml.adapt(e.support_x, e.support_y, steps=10)
        with torch.no_grad():
            return run(net, params, e.query_x).argmax(-1)

    result["maml"] = episode_accuracy(maml_predict, episodes)
    return result


def continual(cfg: MetaBenchConfig, data: tuple[Tensor, Tensor]) -> dict:
    """Task A = digits 0-4, then task B = digits 5-9 (task-incremental: each task has its own five
    logits); accuracy on A's held-out images after learning B, without EWC, with EWC, with replay."""
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    x, y = x[order], y[order]
    cut = int(0.7 * len(x))
    train, test = (x[:cut], y[:cut]), (x[cut:], y[cut:])

    def part(split: tuple[Tensor, Tensor], task_b: bool) -> tuple[Tensor, Tensor]:
        keep = (split[1] >= 5) if task_b else (split[1] < 5)
        return split[0][keep], split[1][keep]

    def accuracy(model: nn.Module, task_b: bool) -> float:
        xs, ys = part(test, task_b)
        offset = 5 if task_b else 0
        with torch.no_grad():
            return float((model(xs)[:, offset:offset + 5].argmax(-1) + offset == ys).float().mean())

    def loss(out: Tensor, target: Tensor) -> Tensor:
        return task_incremental_loss(out, target, 5)

    results = {}
    for method in ("none", "ewc", "replay"):
        torch.manual_seed(cfg.seed)
        model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
        replay = ReplayBuffer(cfg.replay_size, seed=cfg.seed) if method == "replay" else None
        train_task(model, *part(train, False), loss=loss, epochs=10, replay=replay, seed=cfg.seed)
        after_a = accuracy(model, False)
        ewc = EWC(model, *part(train, False), lam=cfg.ewc_lambda, loss=loss) if method == "ewc" else None
        train_task(model, *part(train, True), loss=loss, epochs=cfg.ewc_epochs_b, ewc=ewc, replay=replay,
                   seed=cfg.seed + 1)
        results[method] = {"task_a_after_a": after_a, "task_a_after_b": accuracy(model, False),
                           "task_b": accuracy(model, True)}
    return results


def run_all(cfg: MetaBenchConfig, console: Console | None = None, plot_path: Path | None = None) -> dict:
    """Measure everything and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.set_num_threads(1)
    data = load_digits_tensors()
    sin = {k: sinusoid(cfg, k) for k in cfg.shots}
    shots = {s: fewshot(cfg, s, data) for s in (1, 5)}
    cl = continual(cfg, data)
    result: dict = {**run_header("meta", cfg), "paper_k5_fig3": PAPER_K5, "sinusoid": sin, "fewshot": shots,
                    "continual": cl}
    for k, r in sin.items():
        for steps in (1, 10):
            result[f"sinusoid_k{k}_mse_{steps}step"] = r["maml"][steps][0]
            result[f"sinusoid_k{k}_mse_{steps}step_baseline"] = r["pretrained"][steps][0]
    for s, r in shots.items():
        for method in ("protonet", "maml", "pixel_nearest_mean"):
            result[f"{method}_5way_{s}shot_acc"], result[f"{method}_5way_{s}shot_ci95"] = r[method]
    result["ewc_task_a_acc"] = cl["ewc"]["task_a_after_b"]
    result["no_ewc_task_a_acc"] = cl["none"]["task_a_after_b"]
    result["replay_task_a_acc"] = cl["replay"]["task_a_after_b"]
    _print(result, console)
    if plot_path is not None:
        _plot(sin, plot_path)
    return result


def _print(result: dict, console: Console) -> None:
    table = Table(title="Sinusoid regression: query MSE after k SGD steps on K points (mean ± 95% CI)")
    for col in ("K", "model", "0 steps", "1 step", "4 steps", "10 steps", "paper (K=5, Fig. 3)"):
        table.add_column(col, justify="right")
    for k, r in result["sinusoid"].items():
        for name, paper in (("maml", "0.7 / 0.3 from 4 steps"), ("pretrained", "> 2")):
            cells = [f"{r[name][s][0]:.3f} ± {r[name][s][1]:.3f}" for s in (0, 1, 4, 10)]
            table.add_row(str(k), name, *cells, paper if k == 5 else "")
    console.print(table)
    fs = Table(title="5-way few-shot on unseen digits 5-9 (query accuracy, mean ± 95% CI)")
    for col in ("shots", "pixel nearest mean", "ProtoNet", "MAML"):
        fs.add_column(col, justify="right")
    for s, r in result["fewshot"].items():
        fs.add_row(str(s), *(f"{r[m][0]:.3f} ± {r[m][1]:.3f}" for m in ("pixel_nearest_mean", "protonet", "maml")))
    console.print(fs)
    cl = Table(title="Digits 0-4 then 5-9 (task-incremental): accuracy on held-out images")
    for col in ("method", "A after A", "A after B", "B after B"):
        cl.add_column(col, justify="right")
    for method, r in result["continual"].items():
        cl.add_row(method, *(f"{r[c]:.3f}" for c in ("task_a_after_a", "task_a_after_b", "task_b")))
    console.print(cl)


def _plot(sin: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in sin.items():
        for name, style in (("maml", "-"), ("pretrained", "--")):
            ax.plot([m for m, _ in r[name]], style, marker="o", label=f"{name}, K={k}")
    ax.set_xlabel("gradient steps on the K support points")
    ax.set_ylabel("query MSE")
    ax.set_yscale("log")
    ax.set_title("Sinusoids: query MSE after adaptation (MAML Fig. 3 setup)")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main(quick: bool = False, json_path: Path | None = None, plot_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/meta.py`` (and of ``pimoe bench meta``)."""
    cfg = MetaBenchConfig()
    if quick:
        cfg = MetaBenchConfig(shots=[10], sinusoid_iterations=600, eval_tasks=100, fewshot_episodes=200,
                              fewshot_eval=100, ewc_epochs_b=15)
    result = run_all(cfg, plot_path=plot_path)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
