"""Secure and homomorphic aggregation as Flower strategies + ClientApp handlers (pimoe.privacy inside).

Both modes send the server a *weighted change* instead of a model: client ``i`` with ``n_i``
examples sends ``u_i = [n_i * (w_i - w_global) flattened, n_i]``; the server only ever learns
``sum_i u_i``, from which the FedAvg update is ``sum(n_i * delta_i) / sum(n_i)``.

- Secure aggregation (``--secure-agg``, SecAgg+ of :mod:`pimoe.privacy.secagg`): per round the
  server relays two X25519 public keys and a commitment to the self-mask seed per client
  (``query.secagg_keys``), then each client's encrypted Shamir shares of its self-mask seed and
  mask key (``query.secagg_share``, threshold: a strict majority), clients send self- and
  pairwise-masked fixed-point vectors, and each survivor reveals per other client either its
  self-mask share or (dropped) its mask-key share, once per round (``query.secagg_unmask``).
  The keys are not signed here (no registry of client signing keys: see docs/privacy.md).
- Homomorphic aggregation (``--he``, :mod:`pimoe.privacy.he`): clients share one CKKS key set
  (made by the runner, the key authority); the server holds only the public context, checks each
  client's ciphertexts parse, adds them, and asks a surviving client to decrypt the sum
  (``query.he_decrypt``), which it does only under the rules of :mod:`pimoe.federated.he_round`.

Masked or encrypted updates cannot be screened for NaN or outliers by the server (that is the
point of hiding them): their type and shape are checked, clients send their example count in the
clear, and the decrypted / unmasked sum is checked (:func:`pimoe.federated.bounding.aggregate_problem`:
summed weight = declared counts, norm within ``clip_norm`` x that weight); a sum that fails is not
applied and the round is skipped. A client's refusal of a query is an Error reply, never an abort.
Per-client metrics (train loss, example count) are not aggregated in these modes.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from pimoe.federated.checks import Rejection
from pimoe.federated.records import array as array_of
from pimoe.federated.records import as_bytes, as_bytes_list, example_count
from pimoe.federated.records import config as config_of
from pimoe.federated.secure_client import DECRYPT, KEYS, SHARE, UNMASK, node_ids
from pimoe.federated.strategy import ScreenedAggregation


def apply_mean_change(
    global_arrays: dict[str, np.ndarray], names: list[str], total: np.ndarray
) -> ArrayRecord:
    """Global arrays plus ``total[:-1] / total[-1]`` unflattened onto ``names`` (sorted order)."""
    sizes = [global_arrays[k].size for k in names]
    if total.shape != (sum(sizes) + 1,) or not total[-1] > 0:
        raise ValueError(
            f"aggregate of shape {total.shape} does not fit {sum(sizes)} parameters + a weight"
        )
    mean = total[:-1] / total[-1]
    new = {k: Array(v) for k, v in global_arrays.items()}
    for name, chunk in zip(names, np.split(mean, np.cumsum(sizes)[:-1])):
        ref = global_arrays[name]
        new[name] = Array((ref.astype(np.float64) + chunk.reshape(ref.shape)).astype(ref.dtype))
    return ArrayRecord(new)


def with_config(msg: Message, extra: dict[str, Any]) -> Message:
    """A new instruction like ``msg`` whose config also holds ``extra`` (``msg`` and its content stay as they were)."""
    content = RecordDict(
        {**msg.content, "config": ConfigRecord({**config_of(msg.content), **extra})}
    )
    return Message(
        content,
        dst_node_id=msg.metadata.dst_node_id,
        message_type=msg.metadata.message_type,
        group_id=msg.metadata.group_id,
    )


class ProtectedAggregation(ScreenedAggregation):
    """Shared parts of the secure and HE strategies: declared weights, the aggregate check, the grid."""

    def __init__(self, *, shared_names: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared_names = sorted(shared_names)
        self._grid: Grid | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        self._grid = grid
        return list(super().configure_train(server_round, arrays, config, grid))

    def _ask(self, message_type: str, configs: dict[int, ConfigRecord]) -> list[Message]:
        """Send each node its own config; the replies without an error."""
        assert self._grid is not None
        messages = [
            Message(RecordDict({"config": c}), dst_node_id=n, message_type=message_type)
            for n, c in configs.items()
        ]
        return [r for r in self._grid.send_and_receive(messages) if not r.has_error()]

    @property
    def length(self) -> int:
        return sum(self._global[k].size for k in self.shared_names) + 1

    @staticmethod
    def declared_weight(msg: Message) -> float | None:
        """The example count a reply announced in the clear, or None if missing or not a whole
        number in [1, 2**53] (:func:`~pimoe.federated.records.example_count`)."""
        try:
            return float(example_count(msg.content))
        except (KeyError, TypeError, ValueError):
            return None

    def finish(
        self, server_round: int, total: np.ndarray | None, weight: float, why: str = ""
    ) -> ArrayRecord | None:
        """The new global arrays from a summed weighted change, or None (logged, audited) if it fails the check."""
        from pimoe.federated.bounding import aggregate_problem

        problem = why or (
            aggregate_problem(total, weight, self.clip_norm, slack=1e-4)
            if total is not None
            else "no sum"
        )
        if problem or total is None:
            log(
                WARNING,
                "round %d: aggregate rejected (%s); the global model stays",
                server_round,
                problem,
            )
            if self.audit is not None:
                self.audit.record("aggregate_rejected", round=server_round, reason=problem)
            return None
        return apply_mean_change(self._global, self.shared_names, total)


class SecureAggregation(ProtectedAggregation):
    """FedAvg over SecAgg+-masked updates (:class:`pimoe.privacy.secagg.SecAggPlusClient`): the server learns only their sum.

    Per round: keys -> encrypted Shamir shares (threshold: a strict majority of the clients that
    sent keys) -> masked inputs -> each survivor reveals, per other client, a self-mask share (a
    survivor) or a mask-key share (dropped). A reply with a wrong type / shape or a missing or
    non-positive declared weight is treated as a dropout (its masks are removed, its input is not
    used). A well-typed but corrupted masked input cannot be attributed: the summed weight or the
    norm bound then fails and the round is skipped.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        from pimoe.privacy.secagg import Advertisement

        messages = super().configure_train(server_round, arrays, config, grid)
        nodes = [m.metadata.dst_node_id for m in messages]
        keys = {
            r.metadata.src_node_id: Advertisement(
                *(as_bytes(config_of(r.content)[k]) for k in ("c-pk", "s-pk", "commit"))
            )
            for r in self._ask(
                KEYS, {n: ConfigRecord({"server-round": server_round}) for n in nodes}
            )
        }
        self._keys, self._threshold = keys, len(keys) // 2 + 1
        self._sharers: list[int] = []
        self._inbox: dict[int, dict[int, bytes]] = {}
        if len(keys) < 3:
            log(
                WARNING,
                "round %d: %d clients sent keys; secure aggregation needs 3",
                server_round,
                len(keys),
            )
            return []
        share_cfg = ConfigRecord(
            {
                "ids": [str(n) for n in keys],
                "c-pks": [k.c_pk for k in keys.values()],
                "s-pks": [k.s_pk for k in keys.values()],
                "commits": [k.commitment for k in keys.values()],
                "threshold": self._threshold,
                "server-round": server_round,
            }
        )
        for r in self._ask(SHARE, {n: share_cfg for n in keys}):
            sender = r.metadata.src_node_id
            self._sharers.append(sender)
            for to, blob in zip(
                node_ids(config_of(r.content)["to"]), as_bytes_list(config_of(r.content)["shares"])
            ):
                self._inbox.setdefault(to, {})[sender] = blob
        if self.audit is not None:
            self.audit.record("secagg_keys_relayed", round=server_round, clients=len(keys))
        if len(self._sharers) < self._threshold:
            return []
        sharers = {"secagg-sharers": [str(n) for n in self._sharers]}
        return [
            with_config(m, sharers)
            for m in messages
            if m.metadata.dst_node_id in set(self._sharers)
        ]

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from pimoe.privacy.secagg import secaggplus_sum

        replies = list(replies)
        masked, weights, rejected = {}, {}, []
        for m in replies:
            node = m.metadata.src_node_id
            if m.has_error():
                continue
            vector = (
                m.content["arrays"]["masked"].numpy()
                if "arrays" in m.content and "masked" in m.content["arrays"]
                else None
            )
            weight = self.declared_weight(m)
            if (
                vector is None
                or vector.dtype != np.uint64
                or vector.shape != (self.length,)
                or weight is None
            ):
                rejected.append(
                    Rejection(
                        node,
                        "masked update of the wrong type or shape, or no positive example count",
                    )
                )
            else:
                masked[node], weights[node] = vector, weight
        self.record_round(server_round, replies, len(masked), rejected)
        dropped = [n for n in self._sharers if n not in masked]
        if len(masked) < self._threshold:
            return self.finish(
                server_round, None, 0.0, f"{len(masked)} masked inputs, {self._threshold} needed"
            ), None
        common: dict[str, Any] = {
            "survivors": [str(n) for n in masked],
            "dropped": [str(n) for n in dropped],
            "server-round": server_round,
        }
        configs = {
            v: ConfigRecord(
                {
                    **common,
                    "inbox-from": [str(u) for u in self._inbox.get(v, {})],
                    "inbox": list(self._inbox.get(v, {}).values()),
                }
            )
            for v in masked
        }
        shares = {
            r.metadata.src_node_id: dict(
                zip(
                    node_ids(config_of(r.content)["ids"]),
                    as_bytes_list(config_of(r.content)["shares"]),
                )
            )
            for r in self._ask(UNMASK, configs)
        }
        try:
            total = secaggplus_sum(
                masked, self._keys, self._sharers, shares, self._threshold, server_round
            )
        except ValueError as err:
            return self.finish(server_round, None, 0.0, f"unmasking failed: {err}"), None
        return self.finish(server_round, total, sum(weights.values())), None


class HomomorphicAggregation(ProtectedAggregation):
    """FedAvg over CKKS-encrypted updates: the server adds ciphertexts it cannot read.

    A reply whose ciphertexts do not parse under the public context, or that has the wrong number
    of values or no positive declared weight, is dropped before adding. One client decrypts the
    sum under the rules of :mod:`pimoe.federated.he_round`; if it refuses or fails, the next one
    is asked (each client decrypts at most once per round).
    """

    def __init__(self, *, public_context: bytes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.public_context = public_context
        self.bytes_per_round: list[int] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        messages = super().configure_train(server_round, arrays, config, grid)
        participants = {"he-participants": [str(m.metadata.dst_node_id) for m in messages]}
        return [with_config(m, participants) for m in messages]

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from pimoe.privacy.he import add_encrypted, check_ciphertexts, load_context

        replies = list(replies)
        context = load_context(self.public_context)
        encrypted: dict[int, list[bytes]] = {}
        weights, rejected = {}, []
        for m in replies:
            if m.has_error():
                continue
            node, weight = m.metadata.src_node_id, self.declared_weight(m)
            try:
                chunks = list(m.content["encrypted"]["chunks"])
                check_ciphertexts(context, chunks, self.length)
                if weight is None:
                    raise ValueError("no positive example count")
            except (KeyError, TypeError, ValueError) as err:
                rejected.append(Rejection(node, f"encrypted update rejected: {err}"))
                continue
            encrypted[node], weights[node] = chunks, weight
        self.record_round(server_round, replies, len(encrypted), rejected)
        self.bytes_per_round.append(sum(len(b) for c in encrypted.values() for b in c))
        if not encrypted:
            return None, None
        summed = add_encrypted(context, list(encrypted.values()))
        ask = ConfigRecord(
            {
                "chunks": summed,
                "length": self.length,
                "server-round": server_round,
                "contributors": [str(n) for n in encrypted],
            }
        )
        for node in encrypted:
            for reply in self._ask(DECRYPT, {node: ask}):
                return self.finish(
                    server_round, array_of(reply.content, "sum"), sum(weights.values())
                ), None
        return self.finish(server_round, None, 0.0, "no client decrypted the sum"), None

    def report(self) -> dict[str, Any]:
        return {**super().report(), "he_ciphertext_bytes_per_round": self.bytes_per_round}


class SecureFedAvg(SecureAggregation, FedAvg):
    """Flower FedAvg over SecAgg+-masked updates."""


class SecureFedProx(SecureAggregation, FedProx):
    """Flower FedProx (sends ``proximal-mu``) over SecAgg+-masked updates."""


class HomomorphicFedAvg(HomomorphicAggregation, FedAvg):
    """Flower FedAvg over CKKS-encrypted updates."""


class HomomorphicFedProx(HomomorphicAggregation, FedProx):
    """Flower FedProx (sends ``proximal-mu``) over CKKS-encrypted updates."""


PROTECTED_STRATEGIES: dict[tuple[str, str], type[ProtectedAggregation]] = {
    ("secure", "fedavg"): SecureFedAvg,
    ("secure", "fedprox"): SecureFedProx,
    ("he", "fedavg"): HomomorphicFedAvg,
    ("he", "fedprox"): HomomorphicFedProx,
}
"""(mode, strategy) -> class; the coordinate-wise strategies need updates in the clear (see config.ROBUST)."""
