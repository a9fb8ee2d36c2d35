"""``pimoe.infer`` imports and runs its core without the ``serve`` extra; what needs the extra
fails with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERVE_MODULES = [
    "xxhash",
    "diskcache",
    "cryptography",
    "fastapi",
    "starlette",
    "uvicorn",
    "prometheus_client",
]

SCRIPT = """
import sys
for name in {modules!r}:
    sys.modules[name] = None  # importing it now raises ModuleNotFoundError
import torch
from torch import nn
import pimoe.infer
from pimoe.extras import MissingExtraError
from pimoe.infer import GenerationEngine, InferenceCache, InferenceConfig, InferenceEngine, MicroBatcher, SamplingParams

cache = InferenceCache(max_size=2)
cache[1] = torch.ones(1)
cache[("a", 2)] = 3
assert torch.equal(cache[1], torch.ones(1)) and len(cache) == 2
assert InferenceEngine(InferenceConfig()).infer(nn.Linear(2, 2), torch.ones(1, 2)).shape == (1, 2)
with MicroBatcher(lambda x: x * 2) as batcher:
    assert torch.equal(batcher(torch.ones(3)), torch.full((3,), 2.0))
assert GenerationEngine and SamplingParams(max_tokens=1)

def fails(fn):
    try:
        fn()
    except MissingExtraError as err:
        assert 'pip install "pimoe[serve]"' in str(err), err
        return str(err).split(":")[0]
    raise AssertionError("no MissingExtraError")

print(fails(lambda: pimoe.infer.make_key("x")))
print(fails(lambda: InferenceCache(disk_path={folder!r})))
print(fails(lambda: __import__("pimoe.infer.server")))
print(fails(lambda: InferenceCache(policy="tinylfu").put("key", 1)))
"""


def test_core_works_without_the_serve_extra(tmp_path: Path) -> None:
    code = SCRIPT.format(modules=SERVE_MODULES, folder=str(tmp_path / "disk"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:4] == [
        "make_key needs 'xxhash', which is not installed",
        "the inference cache's disk tier needs 'diskcache', which is not installed",
        "pimoe.infer.http_errors needs 'starlette', which is not installed",
        "TinyLFU's sketch of str/bytes keys needs 'xxhash', which is not installed",
    ]
