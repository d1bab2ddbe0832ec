"""``HeapTrim``: hands the heap's free pages back to the system after every ``every_n_batches`` batches
and at the end of the loop, so a calibration or evaluation loop holds one batch's memory, and the stage
after it starts from what is live rather than from the loop's high-water mark.

Trimming never changes a computed value. On SmolLM2-135M's probe (16 windows of 4 x 512 tokens, one
thread) it cost nothing measurable (277 s against 287 s without, same run) and lowered the peak resident
size from 6.39 to 6.28 GB and the size between batches from ~6.0 to 2.2-3.7 GB. A no-op where the C
library has no ``malloc_trim`` (:func:`pq_lightning.heap.trim_heap`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from pq_lightning.heap import trim_heap


class HeapTrim(Callback):
    """Trim the heap after every ``every_n_batches`` training, validation or prediction batches and at
    the end of each loop; ``trims`` counts the trims done."""

    def __init__(self, every_n_batches: int = 1) -> None:
        super().__init__()
        if isinstance(every_n_batches, bool) or not isinstance(every_n_batches, int) or every_n_batches < 1:
            raise ValueError(f"every_n_batches must be an integer >= 1, got {every_n_batches!r}")
        self.every_n_batches = every_n_batches
        self.trims = 0
        self._batches = 0

    def _batch_done(self) -> None:
        self._batches += 1
        if self._batches % self.every_n_batches == 0:
            self._trim()

    def _trim(self) -> None:
        if trim_heap():
            self.trims += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_done()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_done()

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_done()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trim()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trim()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trim()
