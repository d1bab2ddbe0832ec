"""Triton kernels for the hot paths, with a dispatch rule shared by every caller.

Triton runs on CUDA tensors. On CPU the torch implementations run, except under
``TRITON_INTERPRET=1`` with ``PQ_TRITON=1``, where the kernels run in Triton's interpreter so
the tests can check that both paths give identical bits. ``PQ_TRITON=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the Triton kernels (NVFP4, probe error sum, GPTQ block update) should handle ``t``."""
    flag = os.environ.get("PQ_TRITON")
    if flag == "0" or not triton_available():
        return False
    if t.is_cuda:
        return True
    return flag == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def compiled_cpu_enabled(t: torch.Tensor) -> bool:
    """Whether the ``torch.compile``'d CPU path should handle ``t`` (opt in: ``PQ_COMPILE=1``)."""
    return not t.is_cuda and os.environ.get("PQ_COMPILE") == "1"
