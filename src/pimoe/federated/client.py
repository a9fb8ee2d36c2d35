"""The Flower ClientApp: local training (FedAvg / FedProx), personalization, simulated failures.

Each SuperNode reads its shard from ``context.node_config`` (``partition-id``, ``num-partitions``;
the simulation sets both, a real ``flower-supernode`` gets them from ``--node-config``). A client
that fails replies ``Message(Error(...), reply_to=msg)``, as Flower expects, instead of raising.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from pimoe.federated.config import FederatedConfig
from pimoe.federated.records import arrays, as_float, as_int, config
from pimoe.federated.task import FederatedTask, Split, load_task

SIMULATED_DROPOUT = 1001  # Error code of a client that drops out on purpose (--dropout)
TRAINING_FAILED = 1002
PERSONAL_KEY = "personal-layers"  # where a client keeps its personal layers in context.state


def drops_out(cfg: FederatedConfig, client: int, server_round: int) -> bool:
    """The seeded coin flip that makes ``client`` fail in ``server_round`` (probability ``cfg.dropout``)."""
    return (
        cfg.dropout > 0
        and np.random.default_rng([cfg.seed, server_round, client]).random() < cfg.dropout
    )


SCALES = {"scale": 100.0, "scale1e4": 1e4, "signflip": -1.0}


def poison(
    state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], attack: str
) -> dict[str, torch.Tensor]:
    """What a malicious client sends: its change scaled by 100 or 1e4 or sign-flipped, NaNs, or a wrongly shaped array."""
    first = next(iter(state))
    if attack in SCALES:
        return {k: start[k] + SCALES[attack] * (v - start[k]) for k, v in state.items()}
    if attack == "nan":
        return {**state, first: torch.full_like(state[first], float("nan"))}
    return {**state, first: torch.zeros(state[first].numel() + 1)}


class LocalModel:
    """A client's model built from the global arrays, with its personal layers swapped back in."""

    def __init__(
        self, cfg: FederatedConfig, task: FederatedTask, msg: Message, context: Context
    ) -> None:
        self.cfg = cfg
        self.model: nn.Module = task.make_model(cfg.seed)
        self.model.load_state_dict(arrays(msg.content).to_torch_state_dict())
        if cfg.personal and PERSONAL_KEY in context.state:
            self.model.load_state_dict(
                arrays(context.state, PERSONAL_KEY).to_torch_state_dict(), strict=False
            )

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().clone()
            for k, v in self.model.state_dict().items()
            if not self.cfg.is_personal(k)
        }

    def personal_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().clone()
            for k, v in self.model.state_dict().items()
            if self.cfg.is_personal(k)
        }


def _config(fixed: FederatedConfig | None, context: Context) -> FederatedConfig:
    return fixed if fixed is not None else FederatedConfig.from_run_config(dict(context.run_config))


def _client_id(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def make_client_app(
    fixed: FederatedConfig | None = None, he_context: bytes | None = None
) -> ClientApp:
    """A ClientApp for ``fixed`` settings, or (``None``) for the settings in each run's config.

    ``he_context``: the serialized CKKS context with the secret key, for ``cfg.he`` runs (a real
    SuperNode reads it from the file named by its ``he-context-file`` node-config key instead).
    """
    from pimoe.federated.secure_client import (
        load_key_file,
        protected_reply,
        register_client_handlers,
        weighted_change,
    )

    app = ClientApp()
    register_client_handlers(app, he_context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = _config(fixed, context)
        client, num_clients = _client_id(context)
        server_round = as_int(config(msg.content)["server-round"])
        if drops_out(cfg, client, server_round):
            return Message(
                Error(SIMULATED_DROPOUT, f"client {client} dropped out in round {server_round}"),
                reply_to=msg,
            )
        try:
            torch.set_num_threads(1)
            task = load_task(cfg)
            data = task.client_data(client, num_clients)
            local = LocalModel(cfg, task, msg, context)
            start = local.shared_state()
            mu = as_float(config(msg.content).get("proximal-mu", 0.0))
            seed = cfg.seed * 1_000_003 + server_round * 1009 + client
            metrics = _local_training(cfg, task, local.model, data, mu, seed, context)
            state = local.shared_state()
            if cfg.clip_norm > 0:  # honest clients bound their change; a malicious one skips it
                state = clipped(state, start, cfg.clip_norm)
            if client in cfg.malicious_ids:
                state = poison(state, start, cfg.attack)
            if cfg.personal:
                context.state[PERSONAL_KEY] = ArrayRecord(local.personal_state())
            if cfg.secure_agg or cfg.he:
                he = he_context or (
                    load_key_file(str(context.node_config.get("he-context-file", "")))
                    if cfg.he
                    else None
                )
                content = protected_reply(
                    msg, context, weighted_change(state, start, len(data)), he
                )
                # public: the example count (the server checks the masked weight against it) and the DP budget spent
                content["metrics"] = MetricRecord(
                    {
                        "num-examples": len(data),
                        **({"epsilon": metrics["epsilon"]} if "epsilon" in metrics else {}),
                    }
                )
            else:
                content = RecordDict(
                    {
                        "arrays": ArrayRecord(state),
                        "metrics": MetricRecord({**metrics, "num-examples": len(data)}),
                    }
                )
        except Exception as err:
            return Message(
                Error(TRAINING_FAILED, f"client {client}: {type(err).__name__}: {err}"),
                reply_to=msg,
            )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_local(msg: Message, context: Context) -> Message:
        cfg = _config(fixed, context)
        client, num_clients = _client_id(context)
        torch.set_num_threads(1)
        task = load_task(cfg)
        data = task.client_data(client, num_clients)
        loss, acc = task.evaluate(LocalModel(cfg, task, msg, context).model, data)
        metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": acc, "num-examples": len(data)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def clipped(
    state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], bound: float
) -> dict[str, torch.Tensor]:
    """``state`` whose change from ``start`` is clipped to L2 norm ``bound`` (:func:`~pimoe.federated.bounding.clip_change`)."""
    from pimoe.federated.bounding import clip_change

    out = clip_change(
        {k: v.numpy() for k, v in state.items()}, {k: v.numpy() for k, v in start.items()}, bound
    )
    return {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}


def _local_training(
    cfg: FederatedConfig,
    task: FederatedTask,
    model: nn.Module,
    data: Split,
    mu: float,
    seed: int,
    context: Context,
) -> dict[str, float]:
    """The task's training (FedProx term when ``mu > 0``); DP-SGD through pimoe.privacy when ``dp_epsilon > 0``."""
    if cfg.dp_epsilon > 0:
        from pimoe.federated.private import dp_train

        return dp_train(cfg, model, data, seed, context, loss_fn=task.loss)
    loss = task.train(
        model,
        data,
        epochs=cfg.local_epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=seed,
        proximal_mu=mu,
    )
    return {"train-loss": loss}
