"""Flower strategies with client selection, input screening and a per-round participation log.

``ScreenedFedAvg``, ``ScreenedFedProx``, ``ScreenedFedMedian`` and ``ScreenedFedTrimmedAvg`` are
Flower's own ``FedAvg`` / ``FedProx`` / ``FedMedian`` (coordinate-wise median) /
``FedTrimmedAvg`` (coordinate-wise trimmed mean, ``beta`` cut from each tail) with one mixin in
front that (1) picks the round's clients with a :class:`ClientSelector` (Flower addresses every
node; the mixin keeps the messages of the selected ones), (2) rejects malformed,
non-float, non-finite and outlier updates before Flower aggregates the rest, (3) clips each
accepted change to ``clip_norm`` when set (norm-bounded aggregation), (4) merges a partial update
(personal layers stay on clients) into the global arrays, and (5) records who was sampled, who
failed, who was rejected and who was aggregated in every round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg

from pimoe.federated.bounding import clip_change
from pimoe.federated.checks import Rejection, screen_updates
from pimoe.federated.config import FederatedConfig
from pimoe.federated.records import arrays as arrays_of
from pimoe.federated.records import as_float, example_count, uniform_replies
from pimoe.federated.records import metrics as metrics_of
from pimoe.federated.selection import ClientSelector


@dataclass
class RoundLog:
    """Who took part in one training round."""

    round: int
    sampled: int
    failed: int
    rejected: int
    aggregated: int
    rejections: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class ScreenedAggregation(FedAvg):
    """Flower FedAvg with selection, screening and the round log; placed first in the bases of each strategy (see module docstring)."""

    def __init__(
        self,
        *,
        selector: ClientSelector,
        norm_factor: float = 10.0,
        clip_norm: float = 0.0,
        audit: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, **kwargs)
        self.selector = selector
        self.norm_factor = norm_factor
        self.clip_norm = clip_norm
        self.audit = (
            audit  # anything with .record(event, **fields), e.g. pimoe.privacy.audit.AuditLog
        )
        self.rounds: list[RoundLog] = []
        self._global: dict[str, np.ndarray] = {}
        self.max_epsilon: float | None = None  # largest DP ε any client reported (DP runs only)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        while len(nodes := list(grid.get_node_ids())) < self.selector.min_clients:
            log(
                WARNING,
                "waiting for clients: %d connected, %d needed",
                len(nodes),
                self.selector.min_clients,
            )
            time.sleep(1)
        chosen = set(self.selector.select(nodes))
        # Flower's own sampling (fraction_train=1.0) addresses every node; keep the selected ones
        messages = super().configure_train(server_round, arrays, config, grid)
        return [m for m in messages if m.metadata.dst_node_id in chosen]

    def record_round(
        self, server_round: int, replies: list[Message], kept: int, rejected: list[Rejection]
    ) -> None:
        """Log, audit and append the round's :class:`RoundLog`; note the largest DP ε reported."""
        for (
            m
        ) in replies:  # a client's ε is spent once it trained, whether or not its update is kept
            if not m.has_error() and "metrics" in m.content:
                eps = m.content["metrics"].get("epsilon")
                if isinstance(eps, (int, float)):
                    self.max_epsilon = max(self.max_epsilon or 0.0, float(eps))
        failures = [m.error.reason or f"error {m.error.code}" for m in replies if m.has_error()]
        for r in rejected:
            log(
                WARNING,
                "round %d: rejected update from node %d: %s",
                server_round,
                r.node_id,
                r.reason,
            )
            if self.audit is not None:
                self.audit.record(
                    "update_rejected", round=server_round, node_id=r.node_id, reason=r.reason
                )
        self.rounds.append(
            RoundLog(
                server_round,
                len(replies),
                len(failures),
                len(rejected),
                kept,
                [asdict(r) for r in rejected],
                failures,
            )
        )
        if self.audit is not None:
            self.audit.record(
                "round_aggregated",
                round=server_round,
                mode=type(self).__name__,
                sampled=len(replies),
                failed=len(failures),
                rejected=len(rejected),
                aggregated=kept,
            )

    def screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies that may be aggregated; logs and records the rest."""
        ok = [m for m in replies if not m.has_error()]
        updates: dict[int, dict[str, np.ndarray]] = {}
        rejected: list[Rejection] = []
        for msg in ok:
            node = msg.metadata.src_node_id
            try:
                example_count(msg.content)
                updates[node] = {k: v.numpy() for k, v in arrays_of(msg.content).items()}
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                rejected.append(Rejection(node, f"malformed reply: {type(err).__name__}: {err}"))
        accepted, screened_out = screen_updates(updates, self._global, self.norm_factor)
        keep = [m for m in ok if m.metadata.src_node_id in set(accepted)]
        for m in keep:
            if self.clip_norm > 0:
                clipped = clip_change(updates[m.metadata.src_node_id], self._global, self.clip_norm)
                m.content = RecordDict(
                    {**m.content, "arrays": ArrayRecord({k: Array(v) for k, v in clipped.items()})}
                )
            metrics = metrics_of(m.content)
            self.selector.observe(
                m.metadata.src_node_id,
                as_float(metrics["num-examples"]),
                as_float(metrics.get("train-loss", 0.0)),
            )
        self.record_round(server_round, replies, len(keep), rejected + screened_out)
        return uniform_replies(keep)

    def report(self) -> dict[str, Any]:
        """Run-level results beyond the per-round log: ``epsilon`` (max over clients) when DP is on."""
        return {} if self.max_epsilon is None else {"epsilon": self.max_epsilon}

    def merge(self, partial: ArrayRecord | None) -> ArrayRecord | None:
        """Global arrays with those in ``partial`` replaced (layers absent from it stay as they were)."""
        if partial is None:
            return None
        merged = {k: Array(v) for k, v in self._global.items()}
        merged.update(partial)
        return ArrayRecord(merged)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        keep = self.screen(server_round, list(replies))
        if not keep:
            log(
                WARNING,
                "round %d: no update to aggregate; the global model stays as it was",
                server_round,
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, keep)
        return self.merge(arrays), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's weighted mean of the evaluation metrics, over the replies that declare a
        valid example count (the others are logged and left out instead of ending the run)."""
        keep: list[Message] = []
        for m in replies:
            if m.has_error():
                continue
            try:
                example_count(m.content)
                keep.append(m)
            except (KeyError, TypeError, ValueError) as err:
                log(
                    WARNING,
                    "round %d: left out the evaluation of node %d: %s: %s",
                    server_round,
                    m.metadata.src_node_id,
                    type(err).__name__,
                    err,
                )
        if not keep:
            return None
        return super().aggregate_evaluate(server_round, uniform_replies(keep))


class ScreenedFedAvg(ScreenedAggregation):
    """Flower FedAvg + selection + screening (weights: each client's ``num-examples``)."""


class ScreenedFedProx(ScreenedAggregation, FedProx):
    """Flower FedProx (sends ``proximal-mu`` to clients) + selection + screening."""


class ScreenedFedMedian(ScreenedAggregation, FedMedian):
    """Flower FedMedian (coordinate-wise median, unweighted) + selection + screening."""


class ScreenedFedTrimmedAvg(ScreenedAggregation, FedTrimmedAvg):
    """Flower FedTrimmedAvg (coordinate-wise mean without the ``beta`` tails, unweighted) + selection + screening."""


def make_strategy(cfg: FederatedConfig, audit: Any = None) -> ScreenedAggregation:
    """The strategy named by ``cfg.strategy`` with the config's selection and screening."""
    selector = ClientSelector(cfg.fraction, cfg.min_clients, cfg.selection, cfg.seed)
    common = dict(
        selector=selector,
        norm_factor=cfg.norm_factor,
        clip_norm=cfg.clip_norm,
        audit=audit,
        fraction_evaluate=cfg.fraction_evaluate,
        min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
    )
    if cfg.strategy == "fedprox":
        return ScreenedFedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedmedian":
        return ScreenedFedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return ScreenedFedTrimmedAvg(beta=cfg.trim_beta, **common)
    return ScreenedFedAvg(**common)
