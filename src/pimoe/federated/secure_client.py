"""The client side of secure (SecAgg+) and homomorphic (CKKS) aggregation: the ClientApp's query
handlers and the reply a client sends instead of its arrays (see :mod:`pimoe.federated.secure`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from pimoe.federated.records import as_bytes, as_bytes_list, as_int, as_list
from pimoe.federated.records import config as config_of

KEYS, SHARE, UNMASK, DECRYPT = (
    "query.secagg_keys",
    "query.secagg_share",
    "query.secagg_unmask",
    "query.he_decrypt",
)
REFUSED = 1003  # Error code of a client that refuses a key / share / unmask / decrypt request
SECAGG_STATE = (
    "secagg-state"  # context.state: this round's SecAgg+ client state (secret keys, b_u seed)
)


def weighted_change(
    state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], weight: float
) -> np.ndarray:
    """``[weight * (state - start)`` over the names in sorted order, flattened, ``weight]``: float64 ``[D + 1]``."""
    parts = [
        weight * (state[k].double() - start[k].double()).flatten().numpy() for k in sorted(state)
    ]
    vector = np.concatenate([*parts, [weight]])
    if not np.isfinite(vector).all():
        raise ValueError("the local update holds NaN or inf; not sending it")
    return vector


def node_ids(values: object) -> list[int]:
    return [
        int(v) for v in as_list(values)
    ]  # node ids travel as strings: Flower's are unsigned 64-bit


def _secagg_client(context: Context, server_round: int) -> Any:
    from pimoe.privacy.secagg import SecAggPlusClient

    return SecAggPlusClient(
        context.node_id,
        server_round,
        state=as_bytes(config_of(context.state, SECAGG_STATE)["state"]),
    )


def _save(context: Context, client: Any) -> None:
    context.state[SECAGG_STATE] = ConfigRecord({"state": client.state()})


def _reply(content: dict[str, Any], msg: Message) -> Message:
    return Message(RecordDict({"config": ConfigRecord(content)}), reply_to=msg)


def _refusing(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """A handler whose ValueError / KeyError / TypeError becomes an Error reply (a refusal), as Flower expects."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (KeyError, TypeError, ValueError) as err:
            return Message(Error(REFUSED, f"{type(err).__name__}: {err}"), reply_to=msg)

    return wrapped


def register_client_handlers(app: ClientApp, he_context: bytes | None) -> None:
    """Add the SecAgg+ (keys, shares, unmask) and HE decryption handlers to a ClientApp."""
    from pimoe.privacy.secagg import Advertisement, SecAggPlusClient

    @app.query("secagg_keys")
    @_refusing
    def keys(msg: Message, context: Context) -> Message:
        client = SecAggPlusClient(context.node_id, as_int(config_of(msg.content)["server-round"]))
        _save(context, client)
        ad = client.advertise()
        return _reply({"c-pk": ad.c_pk, "s-pk": ad.s_pk, "commit": ad.commitment}, msg)

    @app.query("secagg_share")
    @_refusing
    def share(msg: Message, context: Context) -> Message:
        cfg = config_of(msg.content)
        client = _secagg_client(context, as_int(cfg["server-round"]))
        ads = map(
            Advertisement,
            as_bytes_list(cfg["c-pks"]),
            as_bytes_list(cfg["s-pks"]),
            as_bytes_list(cfg["commits"]),
        )
        out = client.share(dict(zip(node_ids(cfg["ids"]), ads)), as_int(cfg["threshold"]))
        _save(context, client)
        return _reply({"to": [str(j) for j in out], "shares": list(out.values())}, msg)

    @app.query("secagg_unmask")
    @_refusing
    def unmask(msg: Message, context: Context) -> Message:
        cfg = config_of(msg.content)
        client = _secagg_client(context, as_int(cfg["server-round"]))
        try:
            out = client.unmask(
                node_ids(cfg["survivors"]),
                node_ids(cfg["dropped"]),
                dict(zip(node_ids(cfg["inbox-from"]), as_bytes_list(cfg["inbox"]))),
            )
        finally:
            _save(context, client)  # a refused request still counts as this round's one answer
        return _reply({"ids": [str(j) for j in out], "shares": list(out.values())}, msg)

    @app.query("he_decrypt")
    @_refusing
    def decrypt(msg: Message, context: Context) -> Message:
        from pimoe.federated.he_round import decrypt_aggregate

        if he_context is None:
            raise ValueError("this client holds no CKKS key")
        cfg = config_of(msg.content)
        total = decrypt_aggregate(
            he_context,
            context.state,
            as_int(cfg["server-round"]),
            as_bytes_list(cfg["chunks"]),
            node_ids(cfg["contributors"]),
            as_int(cfg["length"]),
        )
        return Message(RecordDict({"arrays": ArrayRecord({"sum": Array(total)})}), reply_to=msg)


def protected_reply(
    msg: Message, context: Context, vector: np.ndarray, he_context: bytes | None
) -> RecordDict:
    """What a client sends in a secure / HE round instead of its arrays."""
    cfg = config_of(msg.content)
    server_round = as_int(cfg["server-round"])
    if "secagg-sharers" in cfg:
        client = _secagg_client(context, server_round)
        masked = client.mask(vector, node_ids(cfg["secagg-sharers"]))
        _save(context, client)
        return RecordDict({"arrays": ArrayRecord({"masked": Array(masked)})})
    if he_context is None or "he-participants" not in cfg:
        raise ValueError("the server asked for neither masking nor encryption")
    from pimoe.federated.he_round import encrypt_for_round

    chunks = encrypt_for_round(
        he_context,
        context.state,
        server_round,
        node_ids(cfg["he-participants"]),
        context.node_id,
        vector,
    )
    return RecordDict({"encrypted": ConfigRecord({"chunks": chunks})})


def load_key_file(path: str) -> bytes:
    """A serialized CKKS context from a file (real deployments distribute keys out of band)."""
    from pathlib import Path

    if not path or not Path(path).is_file():
        raise ValueError(f"HE is on but the CKKS context file {path!r} does not exist")
    return Path(path).read_bytes()
