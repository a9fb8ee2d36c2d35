"""Which library runs the threaded kernel's float32 matmuls on plain expert weights
(:func:`expert_matmul`, :func:`set_expert_matmul`; re-exported by :mod:`pimoe.moe.threaded`)."""

from __future__ import annotations

import os

import torch

_choice: dict[str, str] = {}

EXPERT_MATMULS = ("avx512", "onednn", "mkl")


def _has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def expert_matmul() -> str:
    """The kernel's float32 matmuls on plain expert weights: ``"avx512"``, its own kernel
    (:mod:`pimoe.moe.gemm_source`) for experts of 4-128 rows in the forward and up to 512 rows in
    the backward, the others as ``"onednn"``, the default on a CPU with AVX-512 (``python
    benchmarks/moe_avx512_matmul.py``); ``"onednn"``, oneDNN in the forward
    and ``at::mm`` in the backward, the default elsewhere where torch has oneDNN; or ``"mkl"``
    (``at::mm`` everywhere: the per-expert loop's results bit for bit). The environment variable
    ``PIMOE_EXPERT_MATMUL`` or :func:`set_expert_matmul` chooses."""
    name = _choice.get("name") or os.environ.get("PIMOE_EXPERT_MATMUL")
    if name is None:
        if _has_avx512():
            name = "avx512"
        else:
            name = "onednn" if torch.backends.mkldnn.is_available() else "mkl"  # type: ignore[no-untyped-call]
    _check_expert_matmul(name)
    return str(name)


def _check_expert_matmul(name: str) -> None:
    if name not in EXPERT_MATMULS:
        raise ValueError(
            f"expert matmul (PIMOE_EXPERT_MATMUL) must be one of {EXPERT_MATMULS}, got {name!r}"
        )
    if name == "onednn" and not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        raise ValueError("this torch build has no oneDNN; choose 'mkl'")
    if name == "avx512" and not _has_avx512():
        raise ValueError("this CPU has no AVX-512; choose 'onednn' or 'mkl'")


def set_expert_matmul(name: str) -> None:
    """Choose :func:`expert_matmul` for this process (``"avx512"``, ``"onednn"`` or ``"mkl"``)."""
    _check_expert_matmul(name)
    _choice["name"] = name
    from pimoe.moe import threaded  # imports this module: the kernel, if built, learns the choice

    module = threaded._state.get("module")
    if module is not None:
        module.set_expert_matmul(name)
