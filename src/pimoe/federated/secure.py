"""Secure and homomorphic aggregation as Flower strategies + ClientApp handlers (pimoe.privacy inside).

Both modes send the server a *weighted change* instead of a model: client ``i`` with ``n_i``
examples sends ``u_i = [n_i * (w_i - w_global) flattened, n_i]``; the server only ever learns
``sum_i u_i``, from which the FedAvg update is ``sum(n_i * delta_i) / sum(n_i)``.

- Secure aggregation (``--secure-agg``, :mod:`pimoe.privacy.secagg`): per round the server relays
  X25519 public keys (a ``query.secagg_keys`` message), clients send pairwise-masked fixed-point
  vectors, and if some clients dropped after the keys went out the survivors reveal the pair seeds
  they shared with them (``query.secagg_reveal``) so the masks still cancel.
- Homomorphic aggregation (``--he``, :mod:`pimoe.privacy.he`): clients share one CKKS key set
  (made by the runner, the key authority); the server holds only the public context, adds the
  ciphertexts, and asks one surviving client to decrypt the sum (``query.he_decrypt``).

Masked or encrypted updates cannot be screened for NaN or outliers by the server (that is the
point of hiding them): only their shape is checked, and clients check their own update is finite.
Per-client metrics (train loss, example count) are not aggregated in these modes.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore import log

from pimoe.federated.checks import Rejection
from pimoe.federated.strategy import ScreenedAggregation

KEYS, REVEAL, DECRYPT = "query.secagg_keys", "query.secagg_reveal", "query.he_decrypt"
SECAGG_KEY = "secagg-private-key"  # context.state: this round's X25519 private key (raw bytes)


def weighted_change(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], weight: float) -> np.ndarray:
    """``[weight * (state - start)`` over the names in sorted order, flattened, ``weight]``: float64 ``[D + 1]``."""
    parts = [weight * (state[k].double() - start[k].double()).flatten().numpy() for k in sorted(state)]
    vector = np.concatenate([*parts, [weight]])
    if not np.isfinite(vector).all():
        raise ValueError("the local update holds NaN or inf; not sending it")
    return vector


def apply_mean_change(global_arrays: dict[str, np.ndarray], names: list[str], total: np.ndarray) -> ArrayRecord:
    """Global arrays plus ``total[:-1] / total[-1]`` unflattened onto ``names`` (sorted order)."""
    sizes = [global_arrays[k].size for k in names]
    if total.shape != (sum(sizes) + 1,) or not total[-1] > 0:
        raise ValueError(f"aggregate of shape {total.shape} does not fit {sum(sizes)} parameters + a weight")
    mean = total[:-1] / total[-1]
    new = {k: Array(v) for k, v in global_arrays.items()}
    for name, chunk in zip(names, np.split(mean, np.cumsum(sizes)[:-1])):
        ref = global_arrays[name]
        new[name] = Array((ref.astype(np.float64) + chunk.reshape(ref.shape)).astype(ref.dtype))
    return ArrayRecord(new)


def _secagg_client(node_id: int, raw_key: bytes | None = None) -> Any:
    """A new key pair, or (``raw_key`` from ``context.state``) the same client in a later message of the round."""
    from pimoe.privacy.secagg import SecAggClient

    return SecAggClient(node_id, private_key=raw_key)


def _query(content: RecordDict, msg: Message) -> Message:
    return Message(content, reply_to=msg)


def register_client_handlers(app: ClientApp, he_context: bytes | None) -> None:
    """Add the key-exchange, seed-reveal and decryption handlers to a ClientApp."""

    @app.query("secagg_keys")
    def keys(msg: Message, context: Context) -> Message:
        client = _secagg_client(context.node_id)
        context.state[SECAGG_KEY] = ConfigRecord({"key": client.private_key_bytes(),
                                                  "round": int(msg.content["config"]["server-round"])})
        return _query(RecordDict({"config": ConfigRecord({"public-key": client.public_key()})}), msg)

    @app.query("secagg_reveal")
    def reveal(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        client = _secagg_client(context.node_id, context.state[SECAGG_KEY]["key"])
        peers = dict(zip((int(i) for i in cfg["peer-ids"]), cfg["peer-keys"]))
        seeds = [client.pair_seed(int(j), peers[int(j)], int(cfg["server-round"])) for j in cfg["dropped"]]
        return _query(RecordDict({"config": ConfigRecord({"seeds": seeds})}), msg)

    @app.query("he_decrypt")
    def decrypt(msg: Message, context: Context) -> Message:
        from pimoe.privacy.he import decrypt_mean, load_context

        if he_context is None:
            raise ValueError("this client holds no CKKS key")
        cfg = msg.content["config"]
        total = decrypt_mean(load_context(he_context), list(cfg["chunks"]), 1, int(cfg["length"]))
        return _query(RecordDict({"arrays": ArrayRecord({"sum": Array(total)})}), msg)


def protected_reply(msg: Message, context: Context, vector: np.ndarray, he_context: bytes | None) -> RecordDict:
    """What a client sends in a secure / HE round instead of its arrays."""
    cfg = msg.content["config"]
    if "peer-ids" in cfg:
        client = _secagg_client(context.node_id, context.state[SECAGG_KEY]["key"])
        peers = dict(zip((int(i) for i in cfg["peer-ids"]), cfg["peer-keys"]))
        masked = client.mask(vector, peers, round_id=int(cfg["server-round"]))
        return RecordDict({"arrays": ArrayRecord({"masked": Array(masked)})})
    if he_context is None:
        raise ValueError("the server asked for neither masking nor encryption")
    from pimoe.privacy.he import encrypt_update, load_context

    return RecordDict({"encrypted": ConfigRecord({"chunks": encrypt_update(load_context(he_context), vector)})})


def load_key_file(path: str) -> bytes:
    """A serialized CKKS context from a file (real deployments distribute keys out of band)."""
    from pathlib import Path

    if not path or not Path(path).is_file():
        raise ValueError(f"HE is on but the CKKS context file {path!r} does not exist")
    return Path(path).read_bytes()


class ProtectedAggregation(ScreenedAggregation):
    """Shared bookkeeping of the secure and HE strategies: the round log, the shared names, the grid."""

    def __init__(self, *args: Any, shared_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared_names = sorted(shared_names)
        self._grid: Grid | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._grid = grid
        return list(super().configure_train(server_round, arrays, config, grid))

    def _ask(self, message_type: str, nodes: list[int], config: ConfigRecord) -> list[Message]:
        assert self._grid is not None
        messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=message_type) for n in nodes]
        return list(self._grid.send_and_receive(messages))


class SecureAggregation(ProtectedAggregation):
    """FedAvg over pairwise-masked updates: the server learns only their sum."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        nodes = [m.metadata.dst_node_id for m in messages]
        replies = self._ask(KEYS, nodes, ConfigRecord({"server-round": server_round}))
        keys = {m.metadata.src_node_id: m.content["config"]["public-key"] for m in replies if not m.has_error()}
        self._peers = ConfigRecord({"peer-ids": [str(n) for n in keys], "peer-keys": list(keys.values()),
                                    "server-round": server_round})
        if messages:  # FedAvg's messages share one RecordDict: add the peer list once
            messages[0].content["config"]["peer-ids"] = self._peers["peer-ids"]
            messages[0].content["config"]["peer-keys"] = self._peers["peer-keys"]
        if self.audit is not None:
            self.audit.record("secagg_keys_relayed", round=server_round, clients=len(keys))
        return [m for m in messages if m.metadata.dst_node_id in keys]

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from pimoe.privacy.secagg import unmask_sum

        replies = list(replies)
        length = sum(self._global[k].size for k in self.shared_names) + 1
        masked, rejected = {}, []
        for m in replies:
            if m.has_error():
                continue
            vector = m.content["arrays"]["masked"].numpy() if "arrays" in m.content else None
            if vector is None or vector.dtype != np.uint64 or vector.shape != (length,):
                rejected.append(Rejection(m.metadata.src_node_id, "masked update of the wrong shape or type"))
            else:
                masked[m.metadata.src_node_id] = vector
        participants = [int(i) for i in self._peers["peer-ids"]]
        dropped = [n for n in participants if n not in masked]
        revealed = {}
        if dropped and masked:
            reveal_cfg = ConfigRecord({**self._peers, "dropped": [str(n) for n in dropped]})
            for r in self._ask(REVEAL, list(masked), reveal_cfg):
                if not r.has_error():
                    revealed[r.metadata.src_node_id] = dict(zip(dropped, r.content["config"]["seeds"]))
        self.record_round(server_round, replies, len(masked), rejected)
        if not masked or set(revealed) != (set(masked) if dropped else set()):
            log(WARNING, "round %d: secure aggregation could not be completed; the global model stays", server_round)
            return None, None
        total = unmask_sum(masked, participants, revealed if dropped else None)
        return apply_mean_change(self._global, self.shared_names, total), None


class HomomorphicAggregation(ProtectedAggregation):
    """FedAvg over CKKS-encrypted updates: the server adds ciphertexts it cannot read."""

    def __init__(self, *args: Any, public_context: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.public_context = public_context
        self.bytes_per_round: list[int] = []

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from pimoe.privacy.he import add_encrypted, load_context

        replies = list(replies)
        encrypted: dict[int, list[bytes]] = {}
        for m in replies:
            if not m.has_error() and "encrypted" in m.content:
                encrypted[m.metadata.src_node_id] = list(m.content["encrypted"]["chunks"])
        counts = [len(c) for c in encrypted.values()]
        common = max(set(counts), key=counts.count) if counts else 0
        rejected = [Rejection(n, f"{len(c)} ciphertext chunks, expected {common}")
                    for n, c in encrypted.items() if len(c) != common]
        encrypted = {n: c for n, c in encrypted.items() if len(c) == common}
        self.record_round(server_round, replies, len(encrypted), rejected)
        self.bytes_per_round.append(sum(len(b) for c in encrypted.values() for b in c))
        if not encrypted:
            return None, None
        summed = add_encrypted(load_context(self.public_context), list(encrypted.values()))
        length = sum(self._global[k].size for k in self.shared_names) + 1
        for reply in self._ask(DECRYPT, list(encrypted)[:1], ConfigRecord({"chunks": summed, "length": length})):
            if not reply.has_error():
                return apply_mean_change(self._global, self.shared_names, reply.content["arrays"]["sum"].numpy()), None
        log(WARNING, "round %d: no client decrypted the sum; the global model stays", server_round)
        return None, None

    def report(self) -> dict[str, Any]:
        return {**super().report(), "he_ciphertext_bytes_per_round": self.bytes_per_round}

