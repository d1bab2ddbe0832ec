"""``SmoothingStatistics``: what activation smoothing needs, collected during a training run's forward passes.

Attach it beside the :class:`~pq_lightning.callbacks.FisherProbe` and the probe's own forward passes
yield the smoothing statistics (:class:`~pq_lightning.smooth.SmoothingObserver`: each consumer
group's producer found by dataflow, per-channel input amax, a uniform sample of input rows), so the
pipeline needs no pass over the calibration data of their own. It reads inputs only; losses,
gradients and weights are unchanged.

Only training batches count. Under DDP every rank observes its own batches and ``on_train_end``
merges them on every rank (max of amax, the smallest keys of the samples: one ``all_gather_object``).
A checkpoint holds this rank's state; a resumed run continues it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from pq_lightning.smooth import SmoothingObserver, SmoothStats, merge_observer_states


class SmoothingStatistics(Callback):
    """Smoothing statistics of the language model's decoder layers over the training batches.

    Args:
        keep_tokens: input rows kept per mapping for the per-input alpha search (uniform without
            replacement over every row seen); ``0`` keeps none (amax only).
        seed: seed of the row sample (offset by the rank under DDP).

    After ``fit``, :attr:`stats` holds the :class:`~pq_lightning.smooth.SmoothStats` on every rank.
    """

    def __init__(self, keep_tokens: int = 256, seed: int = 0) -> None:
        super().__init__()
        if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or keep_tokens < 0:
            raise ValueError(f"keep_tokens must be an integer >= 0, got {keep_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.keep_tokens = keep_tokens
        self.seed = seed
        self.stats: SmoothStats | None = None
        self._observer: SmoothingObserver | None = None
        self._loaded: dict[str, Any] | None = None
        self._active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "SmoothingStatistics does not support FSDPStrategy (FSDP1); use strategy='ddp', FSDP2 "
                "(ModelParallelStrategy) or one device."
            )
        self._detach()
        model = getattr(pl_module, "model", pl_module)
        self._observer = SmoothingObserver(model, keep_tokens=self.keep_tokens, seed=self.seed + trainer.global_rank)
        if self._loaded is not None:
            self._observer.load_state(self._loaded)
            self._loaded = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._active = self._observer is not None
        if self._active:
            self._observer.begin_forward()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._active:
            self._observer.end_forward()
        self._active = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._observer is None:
            return
        if trainer.world_size > 1:  # a collective: every rank takes part
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, self._observer.state())
            merged = states[0]
            for s in states[1:]:
                merged = merge_observer_states(merged, s, self.keep_tokens)
            self._observer.load_state(merged)
        self.stats = self._observer.stats()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._observer is not None:
            self._observer.detach()

    def state_dict(self) -> dict[str, Any]:
        return self._observer.state() if self._observer is not None else dict(self._loaded or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._observer is not None:
            self._observer.load_state(state_dict)
        else:
            self._loaded = dict(state_dict)
