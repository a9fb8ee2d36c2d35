"""``python -m pimoe.models [NAME ...]``: convert (once) and load pretrained models, printing one JSON
line per model: its cache folder, parameter count and load seconds (conversion included when it ran).

Warm the cache before going offline, or time the first conversion against a fresh cache:
``PIMOE_HOME=$(mktemp -d) python -m pimoe.models smollm2-135m-instruct smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pimoe.models.cache import MANIFEST
from pimoe.models.pretrained import cache_path, load_pretrained, pretrained_names


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when missing: tells whether a load rewrote the manifest."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pimoe.models", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "names",
        nargs="*",
        default=pretrained_names(),
        choices=pretrained_names(),
        help="default: all known names",
    )
    parser.add_argument("--cache-dir", default=None, help="folder of converted models")
    parser.add_argument("--no-verify", action="store_true", help="skip re-hashing the cached files")
    args = parser.parse_args(argv)
    for name in args.names:
        manifest = cache_path(name, args.cache_dir) / MANIFEST
        before = _stamp(manifest)
        start = time.perf_counter()
        model, _ = load_pretrained(name, cache_dir=args.cache_dir, verify=not args.no_verify)
        seconds = time.perf_counter() - start
        record = {
            "name": name,
            "cache": str(cache_path(name, args.cache_dir)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_s": round(seconds, 2),
            "converted": _stamp(manifest) != before,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
