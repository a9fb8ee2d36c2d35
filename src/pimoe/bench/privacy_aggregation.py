"""The aggregation half of the privacy benchmark (:mod:`pimoe.bench.privacy`): real client
updates on sklearn digits, secure aggregation (pairwise masking) and CKKS aggregation (TenSEAL)
of them, each timed next to the plaintext sum or mean it replaces."""

from __future__ import annotations

import time

import numpy as np
import torch

from pimoe.bench.timing import interleaved_medians
from pimoe.federated.digits import client_split, mlp
from pimoe.federated.task import train_epochs
from pimoe.privacy import he
from pimoe.privacy.secagg import SecAggClient, decode, encode, unmask_sum


def client_updates(num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Real FedAvg updates ``float32 [9610]``: one local SGD epoch on each client's IID digits shard."""
    torch.manual_seed(seed)
    start = mlp()
    before = torch.nn.utils.parameters_to_vector(start.parameters()).detach()
    updates = []
    for client in range(num_clients):
        model = mlp()
        model.load_state_dict(start.state_dict())
        train_epochs(
            model,
            client_split(client, num_clients, "iid", 1.0, seed),
            epochs=1,
            lr=0.05,
            batch_size=16,
            seed=seed + client,
        )
        after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        updates.append((after - before).numpy().astype(np.float32))
    return updates


def secagg_round(updates: list[np.ndarray], dropout: float, rounds: int) -> dict:
    """Time and check one secure-aggregation round of ``len(updates)`` clients."""
    n, dim = len(updates), updates[0].size
    clients = {i: SecAggClient(i) for i in range(n)}
    keys = {i: c.public_key() for i, c in clients.items()}
    masked = {i: clients[i].mask(updates[i], keys, round_id=1) for i in clients}
    dropped = set(range(0, n, max(1, round(1 / dropout))) if dropout > 0 else [])
    survivors = {i: m for i, m in masked.items() if i not in dropped}
    revealed = {i: clients[i].reveal_seeds_for(dropped) for i in survivors}
    plain = np.sum(np.stack(updates).astype(np.float64), axis=0)
    plain_survivors = np.sum(np.stack([updates[i] for i in survivors]).astype(np.float64), axis=0)
    total = unmask_sum(masked, participants=clients)
    total_dropped = unmask_sum(survivors, participants=clients, revealed=revealed)
    encoded_sum = np.sum(np.stack([encode(u) for u in updates]), axis=0, dtype=np.uint64)
    seconds = interleaved_medians(
        {
            "keygen": lambda: [SecAggClient(i).public_key() for i in range(n)],
            "mask": lambda: [clients[i].mask(updates[i], keys, round_id=2) for i in clients],
            "unmask": lambda: unmask_sum(masked, participants=clients),
            "unmask_with_dropped": lambda: unmask_sum(
                survivors, participants=clients, revealed=revealed
            ),
            "plaintext_sum": lambda: np.sum(np.stack(updates), axis=0),
        },
        rounds,
    )
    return {
        "clients": n,
        "dim": dim,
        "dropped": len(dropped),
        "bit_exact": bool(np.array_equal(total, decode(np.asarray(encoded_sum)))),
        "max_abs_error": float(np.abs(total - plain).max()),
        "max_abs_error_with_dropped": float(np.abs(total_dropped - plain_survivors).max()),
        "keygen_ms_per_client": 1e3 * seconds["keygen"] / n,
        "mask_ms_per_client": 1e3 * seconds["mask"] / n,
        "unmask_ms": 1e3 * seconds["unmask"],
        "unmask_with_dropped_ms": 1e3 * seconds["unmask_with_dropped"],
        "plaintext_sum_ms": 1e3 * seconds["plaintext_sum"],
        "bytes_per_client": int(masked[0].nbytes) + 32,
        "bytes_ratio_to_fp32": (masked[0].nbytes + 32) / (4 * dim),
    }


def he_round(updates: list[np.ndarray], rounds: int) -> dict:
    """Time and check one CKKS aggregation round: clients encrypt, server adds, a client decrypts the mean."""
    n, dim = len(updates), updates[0].size
    params = he.CKKSParams()
    start = time.perf_counter()
    context = he.make_context(params)
    context_seconds = time.perf_counter() - start
    public = he.public_context(context)
    server = he.load_context(public)
    encrypted = [he.encrypt_update(context, u) for u in updates]
    summed = he.add_encrypted(server, encrypted)
    mean = he.decrypt_mean(context, summed, n, dim)
    plain = np.mean(np.stack(updates).astype(np.float64), axis=0)
    seconds = interleaved_medians(
        {
            "encrypt": lambda: [he.encrypt_update(context, u) for u in updates],
            "add": lambda: he.add_encrypted(server, encrypted),
            "decrypt": lambda: he.decrypt_mean(context, summed, n, dim),
            "plaintext_mean": lambda: np.mean(np.stack(updates), axis=0),
        },
        rounds,
    )
    client_bytes = sum(len(c) for c in encrypted[0])
    return {
        "clients": n,
        "dim": dim,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "scale_bits": params.scale_bits,
        "ciphertexts_per_client": len(encrypted[0]),
        "max_abs_error": float(np.abs(mean - plain).max()),
        "update_max_abs": float(max(np.abs(u).max() for u in updates)),
        "context_ms": 1e3 * context_seconds,
        "encrypt_ms_per_client": 1e3 * seconds["encrypt"] / n,
        "add_ms": 1e3 * seconds["add"],
        "decrypt_ms": 1e3 * seconds["decrypt"],
        "plaintext_mean_ms": 1e3 * seconds["plaintext_mean"],
        "bytes_per_client": client_bytes,
        "bytes_ratio_to_fp32": client_bytes / (4 * dim),
        "public_context_bytes": len(public),
    }
