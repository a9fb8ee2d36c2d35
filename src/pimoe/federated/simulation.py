"""Run the ServerApp and ClientApp together on one machine.

``backend="ray"`` is Flower's simulation runtime (``flwr.simulation.run_simulation``): every
client is a virtual SuperNode whose ClientApp runs in a Ray actor (1 CPU and 1 torch thread
each), the ServerApp in a thread of this process. ``backend="inprocess"`` runs the same two apps
through :class:`InProcessGrid`, which calls each ClientApp in turn in this process: no Ray start
(8-18 s), used by the tests and for quick experiments. Every client's randomness is seeded by
(seed, round, client id), so when the same clients are selected (e.g. ``fraction=1``) both give
the same run; with sampling they pick different clients (Ray registers random 64-bit node ids, so
the same seeded draw lands on other shards) and agree only statistically.

Flower's INFO lines (one block per round: sampling, aggregation) are hidden during
:func:`run_federated` unless ``verbose=True``; the ``flwr`` logger's level is restored afterwards
(:func:`flower_log_level`), so the caller's logging setup is left as it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from pimoe.federated.client import make_client_app
from pimoe.federated.config import FederatedConfig
from pimoe.federated.private import he_keys
from pimoe.federated.server import RunRecord, make_server_app, run_server

BACKENDS = ("ray", "inprocess")
SERVER_NODE_ID = 0  # the sender of instructions in the in-process grid (SuperNodes are 1..N)


class InProcessGrid(Grid):
    """A Flower Grid whose SuperNodes are ClientApp calls in this process (node ids 1..N).

    Each node keeps its own ``Context`` (``partition-id``, ``num-partitions`` and a persistent
    ``state``), as a SuperNode does between rounds. Messages are passed as they are (a reply,
    ``Message(content, reply_to=msg)``, names its sender); the ids that fetch the replies are
    the grid's own. Serve the ServerApp inside :func:`flower_task_identity` (Flower's strategies
    stamp new instructions with the identity of the task running in the process).
    """

    def __init__(
        self,
        client_app: ClientApp | Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: dict[str, Any] | None = None,
        run_id: int = 1,
    ) -> None:
        self._app = client_app
        self._run: Any = None
        self.run_id = run_id
        self._contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                state=RecordDict(),
                run_config=dict(run_config or {}),
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
            )
            for node in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        if self._run is None:
            raise RuntimeError("no Run was set on this grid (set_run)")
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> list[int]:
        return list(self._contexts)

    def context(self, node_id: int) -> Context:
        """The persistent context of SuperNode ``node_id``."""
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run each addressed ClientApp now; the returned ids (ours, fresh) fetch the replies."""
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self._contexts:
                raise ValueError(f"no node with id {node}")
            ids.append(uuid4().hex)
            self._replies[ids[-1]] = self._app(msg, self._contexts[node])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def flower_task_identity(run_id: int = 1) -> Iterator[None]:
    """Run a ServerApp outside Flower's runtimes: set the process's task identity, as
    ``flwr.simulation.run_simulation`` does for its ServerApp thread, and restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = []
    for name in ("task_id", "run_id", "node_id"):
        try:
            saved.append(getattr(TaskIdentity, name))
        except RuntimeError:  # not set: this process runs no Flower task
            saved.append(None)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


@contextmanager
def flower_log_level(level: int) -> Iterator[None]:
    """Raise the ``flwr`` logger to at least ``level`` (e.g. ``logging.WARNING``) for the block
    and restore its own level afterwards; a logger already set higher is left as it is."""
    logger = logging.getLogger("flwr")
    saved = logger.level
    logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(saved)


def run_federated(
    cfg: FederatedConfig,
    backend: str = "ray",
    on_round: Callable[[int, float], None] | None = None,
    ray_cpus: int | None = None,
    verbose: bool = False,
) -> RunRecord:
    """Train ``cfg.clients`` clients for ``cfg.rounds`` rounds; return accuracy and participation per round.

    ``ray_cpus``: CPUs Ray may use (default: all); each client takes one, so this many run at once.
    ``verbose``: show Flower's INFO log lines (hidden by default; warnings and errors always show).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    with nullcontext() if verbose else flower_log_level(logging.WARNING):
        return _run(cfg, backend, on_round, ray_cpus)


def _run(
    cfg: FederatedConfig,
    backend: str,
    on_round: Callable[[int, float], None] | None,
    ray_cpus: int | None,
) -> RunRecord:
    record = RunRecord()
    secret, public = he_keys() if cfg.he else (None, None)  # the runner acts as the key authority
    client_app = make_client_app(cfg, secret)
    if backend == "inprocess":
        with flower_task_identity():
            run_server(InProcessGrid(client_app, cfg.clients), cfg, record, on_round, public)
        return record
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=make_server_app(cfg, record, on_round, public),
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": ray_cpus or os.cpu_count() or 1, "log_to_driver": False},
        },
    )
    if len(record.accuracy) != cfg.rounds + 1:
        raise RuntimeError(
            f"the simulation stopped after {len(record.accuracy) - 1} of {cfg.rounds} rounds (see Flower's log)"
        )
    return record
