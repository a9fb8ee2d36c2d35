"""A user's own task (model + data, Flower's task.py) runs through the same apps and the CLI."""

import json

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from pimoe.data.digits import Split
from pimoe.federated.config import FederatedConfig
from pimoe.federated.simulation import run_federated
from pimoe.federated.task import FederatedTask, load_task


class Bilinear(nn.Module):
    """A model pimoe knows nothing about: per-class bilinear scores ``x^T W_c x / 10 + v_c . x``."""

    def __init__(self, features: int = 13, classes: int = 3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(classes, features, features))
        self.v = nn.Parameter(torch.randn(classes, features) * 0.1)

    def forward(self, x: Tensor) -> Tensor:  # [B, 13] -> [B, 3]
        return torch.einsum("bi,cij,bj->bc", x, self.w, x) / 10 + x @ self.v.t()


class WineTask(FederatedTask):
    """sklearn's wine data (178 samples, 13 features, 3 classes): 4 IID shards, 30% held out."""

    name = "wine"

    def __init__(self) -> None:
        from sklearn.datasets import load_wine
        from sklearn.model_selection import train_test_split

        x, y = load_wine(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
        self.train_split = Split(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr))
        self.test_split = Split(torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te))

    def build_model(self) -> nn.Module:
        return Bilinear()

    def client_data(self, partition_id: int, num_partitions: int) -> Split:
        rows = torch.arange(partition_id, len(self.train_split), num_partitions)
        return Split(self.train_split.x[rows], self.train_split.y[rows])

    def test_data(self) -> Split:
        return self.test_split


SPEC = "test_task_protocol:WineTask"  # this file is importable under its basename in pytest


def test_user_task_with_a_plain_module_trains_federated():
    cfg = FederatedConfig(
        task=SPEC, clients=4, rounds=3, fraction=1.0, local_epochs=2, lr=0.05, batch_size=8
    )
    task = load_task(cfg)
    assert isinstance(task, WineTask) and load_task(cfg) is task  # one task object per config
    record = run_federated(cfg, backend="inprocess")
    assert (
        record.accuracy[0] < 0.6 and record.accuracy[-1] > 0.9
    )  # 3 classes; the initial model is near chance
    final = task.make_model(0)
    final.load_state_dict(record.arrays.to_torch_state_dict())
    assert (
        isinstance(final, Bilinear)
        and task.evaluate(final, task.test_data())[1] == record.accuracy[-1]
    )


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("nosuchmodule_xyz:Task", ValueError, "cannot import"),
        ("test_task_protocol:Missing", ValueError, "no attribute"),
        ("test_task_protocol:Bilinear", TypeError, "not a pimoe.federated.task.FederatedTask"),
    ],
)
def test_bad_task_specs(spec, error, match):
    with pytest.raises(error, match=match):
        load_task(FederatedConfig(task=spec))
    with pytest.raises(ValueError, match="module:attr"):
        FederatedConfig(task="wine")


def _federate(args: list[str], monkeypatch) -> tuple[int, str, list[str]]:
    """``pimoe federate ARGS``: (exit code, output, work done) with the training steps recorded."""
    from pimoe.cli import app
    from pimoe.federated import simulation, task

    work: list[str] = []
    real_central, real_run = task.centralized_accuracy, simulation.run_federated

    def central(*a, **k):
        work.append("centralized")
        return real_central(*a, **k)

    def run(*a, **k):
        work.append("federated")
        return real_run(*a, **k)

    monkeypatch.setattr(task, "centralized_accuracy", central)
    monkeypatch.setattr(simulation, "run_federated", run)
    result = CliRunner().invoke(app, ["federate", *args])
    return result.exit_code, result.output, work


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--backend", "nosuch"], "nosuch"),
        (["--model", "foo"], "foo"),
        (["--task", "nosuchmodule_xyz:Task"], "nosuchmodule_xyz"),
        (["--personal-layers", "nothere"], "nothere"),
        (["--partition", "zipf"], "zipf"),
        (["--alpha", "-1"], "alpha"),
    ],
)
def test_bad_options_fail_in_one_line_before_any_work(args, names, monkeypatch):
    code, output, work = _federate(["--backend", "inprocess", *args], monkeypatch)
    assert code == 2 and work == []
    assert "Traceback" not in output and names in output
    assert len(output.splitlines()) <= 8  # typer's usage line and boxed message, not a traceback


def test_cli_runs_a_user_task(tmp_path, monkeypatch):
    out = tmp_path / "wine.json"
    code, output, work = _federate(
        [
            "--task",
            SPEC,
            "--clients",
            "4",
            "--rounds",
            "2",
            "--fraction",
            "1",
            "--local-epochs",
            "2",
            "--lr",
            "0.05",
            "--partition",
            "iid",
            "--backend",
            "inprocess",
            "--json",
            str(out),
        ],
        monkeypatch,
    )
    assert code == 0, output
    assert work == ["centralized", "federated"]
    result = json.loads(out.read_text())
    assert result["config"]["task"] == SPEC and result["final_accuracy"] > 0.85
    assert (tmp_path / "wine.png").stat().st_size > 0
