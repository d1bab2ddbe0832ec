"""``FirstBatchFlops``: the FLOPs of one training batch, to state a run's work per token cheaply.

Counting every op of a run costs a Python call per op (10-25 % of a CPU step); every batch of a
calibration pass does the same work per token, so one counted batch gives the per-token figure at a
negligible cost. Counts batch ``batch_idx`` (default the first) with :func:`pq_lightning.flops.count_flops`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from pq_lightning.flops import FlopTally, count_flops


class FirstBatchFlops(Callback):
    """FLOPs (``tally.flops``) and tokens (``tokens``) of one training batch of this rank."""

    def __init__(self, batch_idx: int = 0) -> None:
        super().__init__()
        if batch_idx < 0:
            raise ValueError(f"batch_idx must be >= 0, got {batch_idx}")
        self.batch_idx = batch_idx
        self.tally = FlopTally()
        self.tokens = 0
        self._ctx: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch_idx and self._ctx is None and not self.tally.flops:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            self.tokens = int(ids.numel())
            self._ctx = count_flops(self.tally)
            self._ctx.__enter__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def per_token(self, forward_flops_per_token: float) -> float:
        """Forward-equivalents per token of the counted batch."""
        return self.tally.per_token(self.tokens, forward_flops_per_token)
