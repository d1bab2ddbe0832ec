"""Per-window activations of a layer-by-layer walk, with a cap on what stays in memory.

The GPTQ refiner keeps every calibration window's hidden states between layers (and, for a group,
its inputs until the Hessians are built). Held as tensors that is ``windows × seqlen × hidden`` per
copy: it grows with the data. An :class:`ActivationStore` keeps tensors on their device while a
shared :class:`ResidentBudget` has room and writes the rest to a scratch file, read back one window
at a time in the order they were written: resident memory stays under the budget whatever the
number of windows, and the values are bit for bit the same.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch


class ResidentBudget:
    """Bytes of activations allowed in memory, shared by the stores of one walk (``None``: no limit)."""

    def __init__(self, limit_bytes: int | None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"the resident activation budget must be >= 0 bytes, got {limit_bytes}")
        self.limit = limit_bytes
        self.used = 0
        self.peak = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


@dataclass
class _Spilled:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class ActivationStore:
    """An append-only list of tensors, resident while ``budget`` allows, spilled to a file beyond it."""

    def __init__(self, budget: ResidentBudget, spill_dir: str | os.PathLike | None = None) -> None:
        self.budget = budget
        self.spill_dir = spill_dir
        self._items: list[torch.Tensor | _Spilled] = []
        self._file = None
        self._resident = 0
        self.spilled_bytes = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.budget.take(nbytes):
            self._items.append(t)
            self._resident += nbytes
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="pq-activations-", dir=self.spill_dir)
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
        self._items.append(_Spilled(offset, nbytes, tuple(t.shape), t.dtype, t.device))
        self.spilled_bytes += nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, torch.Tensor):
            return item
        self._file.seek(item.offset)
        raw = bytearray(self._file.read(item.nbytes))
        return torch.frombuffer(raw, dtype=torch.uint8).view(item.dtype).reshape(item.shape).to(item.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def close(self) -> None:
        """Drop every tensor and the scratch file; the budget gets its bytes back."""
        self._items = []
        self.budget.give(self._resident)
        self._resident = 0
        if self._file is not None:
            self._file.close()
            self._file = None
