"""Content-hashed cache folders: built in a temp folder, checked against a manifest, swapped in atomically.

A cache entry is a folder ``<root>/<name>`` holding model files plus ``pimoe-manifest.json``:
``{"format": 1, "files": {relative path: {"size": int, "sha256": hex}}, ...extra}``. The manifest is
written last inside a temp folder ``<root>/.<name>.tmp-*`` that is then renamed to ``<root>/<name>``,
so a process killed mid-build leaves only a temp folder, never a half entry. Builders hold an
exclusive lock file (``<root>/.<name>.lock``) so that two processes never build the same entry at
once and stale temp folders can be removed safely.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pimoe.io import atomic_write_text

MANIFEST = "pimoe-manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str], bar: tqdm | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (advances ``bar`` by the bytes read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def keyed_folder(root: Path, name: str, parts: dict[str, Any]) -> Path:
    """``root / "<name>-<key>"``: ``name`` with path-unsafe characters replaced, ``key`` the first
    12 hex digits of the sha256 of ``parts`` as sorted JSON (what an entry was built from: base
    weights, settings, data), so that other inputs get another folder, never a stale one."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key}"


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"file": name, "size": bytes, "sha256": hex}`` of one file (e.g. the source a cache came from)."""
    file = Path(path)
    return {"file": file.name, "size": file.stat().st_size, "sha256": sha256_file(file)}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, extra: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Hash every file under ``folder`` and write the manifest there (atomically); returns it."""
    files = _files(folder)
    manifest: dict[str, Any] = {"format": FORMAT, **extra, "files": {}}
    with tqdm(
        total=sum(p.stat().st_size for p in files),
        unit="B",
        unit_scale=True,
        desc="hashing",
        disable=not progress,
        leave=False,
    ) as bar:
        for path in files:
            rel = path.relative_to(folder).as_posix()
            manifest["files"][rel] = {"size": path.stat().st_size, "sha256": sha256_file(path, bar)}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, or None when it is missing, unreadable or of another format."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        return None
    return manifest


def check_folder(folder: Path, verify: bool = True, progress: bool = False) -> str | None:
    """Why ``folder`` is not a complete cache entry, or None when it is.

    Always checks that the manifest is readable and every listed file exists with its recorded size;
    with ``verify`` also re-hashes every file against its recorded sha256.
    """
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder / MANIFEST} is missing or unreadable"
    entries: dict[str, Any] = manifest["files"]
    if not entries:
        return f"{folder / MANIFEST} lists no files"
    for rel, entry in entries.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
    if verify:
        total = sum(int(e["size"]) for e in entries.values())
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="verifying",
            disable=not progress,
            leave=False,
        ) as bar:
            for rel, entry in entries.items():
                if sha256_file(folder / rel, bar) != entry.get("sha256"):
                    return f"{folder / rel} does not match its sha256 in the manifest"
    return None


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<parent>/.<name>.lock`` (POSIX ``flock``; a no-op where it is missing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: builds are still atomic, only not serialized
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def stale_folders(target: Path) -> list[Path]:
    """Temp and retired folders of ``target`` left behind by interrupted builds."""
    parent = target.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefixes))


def clean_stale(target: Path) -> None:
    """Remove the folders of :func:`stale_folders`; the caller must hold :func:`build_lock`."""
    for stale in stale_folders(target):
        shutil.rmtree(stale, ignore_errors=True)


def build_folder(
    target: Path, build: Callable[[Path], dict[str, Any]], progress: bool = False
) -> dict[str, Any]:
    """Build the cache entry ``target`` atomically; returns its manifest.

    ``build(tmp)`` writes the files into the empty folder ``tmp`` and returns the extra manifest
    fields. The caller must hold :func:`build_lock`. Stale temp folders are removed first; an
    existing ``target`` (e.g. a corrupt one) is replaced only once the new entry is complete.
    """
    clean_stale(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        manifest = write_manifest(tmp, build(tmp), progress=progress)
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, retired)
            os.rename(tmp, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
