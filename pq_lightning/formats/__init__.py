"""Quantization formats: one object per format, shared by cost, probe, GPTQ, evaluation and export.

>>> from pq_lightning.formats import get_format
>>> get_format("nvfp4").bits((4096, 4096))
75497536

Register a new format without editing the core::

    from pq_lightning.formats import QuantFormat, register_format

    class MyFormat(QuantFormat):
        name = "my_format"
        ...

    register_format(MyFormat())

Probe, cost, refiner, export and the served model ask a format what it needs through its declared
capabilities (:class:`QuantFormat`: ``static_input_scale``, ``shares_global_scale``, ``refine``,
``compact_weight``...), never through its class; :func:`register_format` checks that the
declarations agree with the methods. :mod:`pq_lightning.formats.fp8_tensor` is a worked example that
is not registered by default.
"""

from __future__ import annotations

from .base import NonFiniteTensorError, QuantFormat, check_finite
from .code_grid import CodeGrid
from .compact import CompactWeight
from .fp8 import BF16, FP8, FP8W8A16
from .nvfp4 import NVFP4, NVFP4A16, NVFP4Weight

_REGISTRY: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat, *, overwrite: bool = False) -> QuantFormat:
    """Add ``fmt`` to the registry under ``fmt.name`` (lower case), once its declarations check out."""
    if not isinstance(fmt, QuantFormat):
        raise TypeError(f"register_format takes a QuantFormat instance, got {type(fmt).__name__}")
    fmt.check_declarations()
    key = fmt.name.lower()
    if not key:
        raise ValueError(f"{type(fmt).__name__} has no name; set the class attribute `name`")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"a format named {key!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = fmt
    return fmt


def unregister_format(name: str) -> QuantFormat:
    """Remove the format called ``name`` (case-insensitive) from the registry and return it."""
    try:
        return _REGISTRY.pop(name.lower())
    except KeyError:
        raise KeyError(f"no format named {name!r} is registered; registered formats: {sorted(_REGISTRY)}") from None


def get_format(name: str | QuantFormat) -> QuantFormat:
    """The registered format called ``name`` (case-insensitive)."""
    if isinstance(name, QuantFormat):
        return name
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown format {name!r}; registered formats: {sorted(_REGISTRY)}. "
            "Register a new one with pq_lightning.formats.register_format."
        ) from None


def available_formats() -> list[str]:
    return sorted(_REGISTRY)


for _fmt in (NVFP4(), NVFP4A16(), FP8(), FP8W8A16(), BF16()):
    register_format(_fmt)

__all__ = [
    "BF16",
    "CodeGrid",
    "CompactWeight",
    "FP8",
    "FP8W8A16",
    "NVFP4",
    "NVFP4A16",
    "NVFP4Weight",
    "NonFiniteTensorError",
    "QuantFormat",
    "available_formats",
    "check_finite",
    "get_format",
    "register_format",
    "unregister_format",
]
