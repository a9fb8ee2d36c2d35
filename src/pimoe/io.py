"""Files: atomic writes (temp file in the target folder, fsync, rename over the target), removal of
temp files that killed writers left behind, a content hash of tensors, and a safetensors header
check that runs before any tensor is allocated.

Temp files are named ``.{target name}.{random}.tmp`` and, where the OS has ``flock`` (POSIX),
their writer holds an exclusive lock on them until the rename. :func:`clean_stale_temps` removes
only temps whose lock it can take, i.e. whose writer is dead; without ``flock`` it falls back to
an age threshold.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

NO_LOCK_STALE_AFTER_S = 24 * 3600.0
"""Without ``flock``, a temp file is stale once it is this old (no writer takes a day)."""

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_pattern(target_name: str) -> re.Pattern[str]:
    """Our temp names for ``target_name``: ``.{name}.{random}.tmp``; the random part (mkstemp's
    letters, or hex) has no dot, so temps of ``a.b`` are never taken for temps of ``a``."""
    return re.compile(rf"\.{re.escape(target_name)}\.[A-Za-z0-9_-]+\.tmp")


def lock_file(fd: int, exclusive: bool = True, blocking: bool = True) -> bool:
    """``flock`` the open file ``fd`` (exclusive or shared); False if ``blocking=False`` and
    another open file holds a conflicting lock. The kernel drops the lock when the file is
    closed or its process dies. Without ``flock`` (Windows) it does nothing and returns True."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(
            fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        )
    except BlockingIOError:
        return False
    return True


def clean_stale_temps(
    folder: str | os.PathLike[str], target_name: str, min_age_s: float = 0.0
) -> list[Path]:
    """Remove the temp files of ``folder/target_name`` whose writer is gone; return them.

    A temp counts as stale when no live process holds its lock (POSIX ``flock``; released by the
    kernel when a writer is killed) and it is at least ``min_age_s`` seconds old (a guard for
    writers that do not lock). Without ``flock`` it must be :data:`NO_LOCK_STALE_AFTER_S` old.
    Files of other names, and temps of other targets, are never touched.
    """
    folder = Path(folder)
    pattern = _temp_pattern(target_name)
    min_age = max(min_age_s, NO_LOCK_STALE_AFTER_S if fcntl is None else 0.0)
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < min_age or not lock_file(fd, blocking=False):
                continue
            path.unlink(missing_ok=True)  # unlinked while we hold the lock: no writer can have it
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _locked_temp(target: Path) -> tuple[int, Path]:
    """A new temp file next to ``target``, open and locked by us (fd, path)."""
    while True:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        lock_file(fd)
        try:  # a cleaner may have taken it between mkstemp and our lock: then start again
            if os.stat(name).st_ino == os.fstat(fd).st_ino:
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that takes a file name (``torch.save``,
    ``safetensors.torch.save_model``, ...); on a normal exit it is fsynced and renamed over
    ``path``, on an exception removed. Stale temps of ``path`` are removed first. A crash leaves
    the old file or the new one, never half of one.

    Example::

        with atomic_output("model.safetensors") as tmp:
            save_model(model, str(tmp))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent, target.name)
    fd, tmp = _locked_temp(target)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # releases the lock


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data``; a crash leaves the old file or the new one, never half of one.
    Temp files of earlier writers of ``path`` that were killed are removed first."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(
    fig: Any, path: str | os.PathLike[str], dpi: int = 100, bbox_inches: str | None = None
) -> None:
    """Render the matplotlib figure ``fig`` as PNG into ``path`` atomically, then close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=bbox_inches)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order.

    Equal for equal contents on any device and memory layout; any changed byte (a NaN written
    into a weight, a flipped bit), name, dtype or shape changes it. Quantized tensors are hashed
    by their integer values and quantization parameters.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_digest: {name!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_meta:
            raise TypeError(
                f"tensor_digest: {name!r} has no dense data ({t.layout}, device {t.device})"
            )
        parts: list[Any] = [name, str(t.dtype), list(t.shape)]
        if t.is_quantized:
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                parts.append([t.q_scale(), t.q_zero_point()])
            else:
                parts.append(t.q_per_channel_axis())
                rest = {
                    "scales": t.q_per_channel_scales(),
                    "zero_points": t.q_per_channel_zero_points(),
                }
                parts.append(tensor_digest(rest))
            t = t.int_repr()
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        head = json.dumps(parts).encode("utf-8")
        digest.update(struct.pack("<QQ", len(head), data.nbytes))
        digest.update(head)
        digest.update(data.data)
    return digest.hexdigest()


def read_safetensors_header(
    source: str | os.PathLike[str] | bytes,
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The metadata and ``{name: (dtype, shape)}`` of a safetensors file (a path) or buffer
    (bytes), read without loading any tensor.

    Raises:
        ValueError (naming the file): not a safetensors file, a header over 100 MB, or a tensor
            whose declared dtype and shape do not match its byte range in the file.
    """
    label = "safetensors bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        size, prefix = len(source), bytes(source[:8])
        raw = bytes(source[8 : 8 + min(_MAX_SAFETENSORS_HEADER, max(size - 8, 0))])
    else:
        with open(source, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            raw = b""
            if len(prefix) == 8:
                (n,) = struct.unpack("<Q", prefix)
                raw = handle.read(n) if n <= min(_MAX_SAFETENSORS_HEADER, size - 8) else b""
    if len(prefix) < 8:
        raise ValueError(f"{label}: not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", prefix)
    if n > _MAX_SAFETENSORS_HEADER or n > size - 8:
        raise ValueError(
            f"{label}: not a safetensors file (header length {n} in a {size}-byte file)"
        )
    try:
        header = json.loads(raw[:n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{label}: not a safetensors file (header is not JSON: {err})") from err
    except RecursionError:
        raise ValueError(f"{label}: not a safetensors file (header nested too deeply)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{label}: __metadata__ must map names to strings")
    data_size = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            valid = (
                dtype in _SAFETENSORS_DTYPE_BYTES
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end <= data_size
                and end - begin == math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype]
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f"{label}: tensor {name[:200]!r} has an invalid entry {repr(info)[:200]} "
                f"(its dtype and shape must fill its byte range inside the {data_size} data bytes)"
            )
        tensors[name] = (dtype, tuple(shape))
    return metadata, tensors


def check_safetensors_shapes(
    source: str | os.PathLike[str] | bytes,
    expected: Mapping[str, Sequence[int]],
    may_be_missing: Collection[str] = (),
) -> dict[str, str]:
    """Check, before allocating anything, that a safetensors file holds exactly the tensors
    ``expected`` (name -> shape, e.g. from a model built on the ``meta`` device) with those
    shapes; names in ``may_be_missing`` (e.g. tied weights stored once) may be absent.
    Returns the file's metadata.

    Raises:
        ValueError (naming the file and the first offending tensor): an unexpected or missing
            tensor, a shape that differs, or an invalid header (:func:`read_safetensors_header`).
    """
    label = "safetensors bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    metadata, tensors = read_safetensors_header(source)
    for name, (_, shape) in tensors.items():
        if name not in expected:
            raise ValueError(f"{label}: unexpected tensor {name!r}")
        if tuple(expected[name]) != shape:
            raise ValueError(
                f"{label}: tensor {name!r} has shape {list(shape)}, expected {list(expected[name])}"
            )
    missing = sorted(set(expected) - set(tensors) - set(may_be_missing))
    if missing:
        raise ValueError(f"{label}: missing tensor(s) {missing[:5]}")
    return metadata


def check_hf_folder_fits(folder: str | os.PathLike[str], slack: float = 1.5) -> None:
    """Refuse, before any allocation, a Hugging Face model folder whose ``config.json`` declares
    more parameters than its weight files can hold (a small crafted folder with
    ``vocab_size=10**12`` would otherwise make ``from_pretrained`` allocate terabytes).

    The declared count comes from the config's model built on the ``meta`` device (no memory);
    the stored count from the safetensors headers (``*.safetensors``), or, for other weight files,
    one element per byte (the most any dtype packs). ``slack`` allows for buffers and heads that
    the files do not store. ``ValueError`` naming the folder on a mismatch.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    root = Path(folder)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    declared = sum(p.numel() for p in model.parameters())
    stored = 0
    for path in root.iterdir():
        if path.suffix == ".safetensors":
            stored += sum(
                math.prod(shape) for _, shape in read_safetensors_header(path)[1].values()
            )
        elif path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"):
            stored += path.stat().st_size
    if declared > slack * stored:
        raise ValueError(
            f"{root}: config.json declares {declared:,} parameters but the weight files hold at most "
            f"{stored:,}: a damaged or crafted folder"
        )
