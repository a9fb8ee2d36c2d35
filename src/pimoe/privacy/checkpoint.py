"""Encrypted checkpoints: a state dict as safetensors bytes sealed with AES-256-GCM (see crypto.py).

The file is a :func:`pimoe.privacy.crypto.seal` blob whose associated data is a fixed label, so
a sealed cache entry cannot be passed off as a checkpoint. Writes are atomic (pimoe.io): a temp
file ``.{name}.{random}.tmp`` next to the target, locked by its writer, renamed over the target.
A save killed mid-write leaves its temp behind; the next save or load of the same path removes
the temps of that path whose writer is dead (:func:`pimoe.io.clean_stale_temps`; temps still
locked by a live writer, other targets' temps and other files are never touched). The key comes
from the caller, e.g. ``load_key()`` (``$PIMOE_KEY``) or ``load_key(path=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from pimoe.io import atomic_write_bytes, clean_stale_temps
from pimoe.privacy.audit import AuditLog
from pimoe.privacy.crypto import IntegrityError, open_sealed, seal

CHECKPOINT_LABEL = b"pimoe-encrypted-checkpoint-v1"


def seal_state_dict(
    state_dict: dict[str, torch.Tensor], key: bytes, label: bytes = CHECKPOINT_LABEL
) -> bytes:
    """``state_dict`` (name -> tensor) as safetensors bytes sealed with ``key`` (AES-256-GCM).

    Tensors are copied to CPU; tied (shared-storage) tensors are stored once each. ``label`` is
    the authenticated context: :func:`open_state_dict` needs the same one.
    """
    if not isinstance(state_dict, dict) or not state_dict:
        raise TypeError("state_dict must be a non-empty dict of name -> tensor")
    bad = [name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors; not tensors: {bad[:5]}")
    tensors = {
        name: value.detach().cpu().contiguous().clone() for name, value in state_dict.items()
    }
    return seal(key, safetensors_save(tensors), label)


def open_state_dict(
    blob: bytes, key: bytes, label: bytes = CHECKPOINT_LABEL
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`seal_state_dict`; raises IntegrityError if ``blob`` does not authenticate."""
    return safetensors_load(open_sealed(key, blob, label))


def save_encrypted(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    key: bytes,
    audit: AuditLog | None = None,
) -> int:
    """Write ``state_dict`` (name -> tensor) encrypted to ``path`` atomically; return the file size in bytes.

    Temps that earlier saves of ``path`` left when they were killed are removed first.
    """
    blob = seal_state_dict(state_dict, key)
    atomic_write_bytes(path, blob)
    if audit is not None:
        audit.record("checkpoint_saved", path=str(path), tensors=len(state_dict), bytes=len(blob))
    return len(blob)


def load_encrypted(
    path: str | os.PathLike[str], key: bytes, audit: AuditLog | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`save_encrypted` (CPU tensors); remove the temps killed saves of it left.

    Raises IntegrityError (a ValueError) if the file was tampered with or truncated, or the key
    is wrong; the failure is recorded in ``audit`` if given.
    """
    clean_stale_temps(Path(path).parent, Path(path).name)
    try:
        state = open_state_dict(Path(path).read_bytes(), key)
    except IntegrityError as error:
        if audit is not None:
            audit.record("authentication_failed", path=str(path), reason=str(error))
        raise IntegrityError(f"encrypted checkpoint {path}: {error}") from None
    if audit is not None:
        audit.record("checkpoint_loaded", path=str(path))
    return state
