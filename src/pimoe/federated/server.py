"""The Flower ServerApp: runs the configured strategy and evaluates the global model centrally.

Centralized evaluation (Flower's ``evaluate_fn``) scores the global model on the task's test data
(the 360 held-out digits for the built-in task) before the first round and after every round. The ServerApp fills a :class:`RunRecord`
(in a simulation the caller reads it afterwards; under ``flwr run`` it is written as JSON to the
``result-path`` run-config key when one is given).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from pimoe.federated.config import FederatedConfig
from pimoe.federated.secure_client import load_key_file
from pimoe.federated.strategy import RoundLog, make_strategy
from pimoe.federated.task import load_task
from pimoe.io import atomic_write_text


@dataclass
class RunRecord:
    """What a run produced: test accuracy per round (index 0 = before training) and participation."""

    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    rounds: list[RoundLog] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    arrays: ArrayRecord | None = None  # the final global model (not part of to_dict)

    @property
    def clients_per_round(self) -> list[int]:
        return [r.aggregated for r in self.rounds]

    def rounds_to_reach(self, target: float) -> int | None:
        """First round whose test accuracy is >= ``target`` (0 = the initial model; None if never)."""
        return next((r for r, a in enumerate(self.accuracy) if a >= target), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy_per_round": self.accuracy,
            "loss_per_round": self.loss,
            "clients_per_round": self.clients_per_round,
            "rounds": [asdict(r) for r in self.rounds],
            **self.extra,
        }


def run_server(
    grid: Grid,
    cfg: FederatedConfig,
    record: RunRecord,
    on_round: Callable[[int, float], None] | None = None,
    he_public: bytes | None = None,
) -> None:
    """Train for ``cfg.rounds`` rounds over ``grid``; fill ``record``; call ``on_round(round, accuracy)``.

    ``he_public``: the public CKKS context for ``cfg.he`` runs.
    """
    from pimoe.federated.private import make_audit, make_protected_strategy

    audit = make_audit(cfg)
    strategy = make_protected_strategy(cfg, audit, he_public) or make_strategy(cfg, audit)
    task = load_task(cfg)
    model = task.make_model(cfg.seed)
    test = task.test_data()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = task.evaluate(model, test)
        record.accuracy.append(acc)
        record.loss.append(loss)
        if on_round is not None:
            on_round(server_round, acc)
        return MetricRecord({"accuracy": acc, "loss": loss})

    initial = ArrayRecord(model.state_dict())
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.rounds,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs}),
        evaluate_fn=evaluate_fn,
    )
    record.rounds = strategy.rounds
    record.arrays = (
        result.arrays if len(result.arrays) else initial
    )  # no round aggregated: still the initial model
    record.extra.update(strategy.report())


def make_server_app(
    fixed: FederatedConfig | None = None,
    record: RunRecord | None = None,
    on_round: Callable[[int, float], None] | None = None,
    he_public: bytes | None = None,
) -> ServerApp:
    """A ServerApp for ``fixed`` settings, or (``None``) for the settings in the run config.

    Run-config keys besides :class:`FederatedConfig`'s: ``result-path`` (write the RunRecord JSON
    there) and ``he-public-context-file`` (the public CKKS context, for ``he = true``).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        result_path = str(run_config.pop("result-path", ""))
        he_file = str(run_config.pop("he-public-context-file", ""))
        cfg = fixed if fixed is not None else FederatedConfig.from_run_config(run_config)
        out = record if record is not None else RunRecord()
        public = he_public if he_public is not None or not cfg.he else load_key_file(he_file)
        run_server(grid, cfg, out, on_round, public)
        if result_path:
            atomic_write_text(result_path, json.dumps(out.to_dict(), indent=2))

    return app
