"""``GPTQRefiner``: the GPTQ refiner as a LightningModule (a thin adapter over :func:`refine_model`).

Run it with ``trainer.predict(refiner, dataloaders=...)`` (or ``trainer.validate``)::

    refiner = GPTQRefiner(hf_model, plan.formats, GPTQConfig())
    trainer = lightning.Trainer(accelerator="auto", devices=1, logger=False)
    trainer.predict(refiner, dataloaders=[fit_loader, heldout_loader], return_predictions=False)
    export_checkpoint(..., quantized=refiner.output.packed, input_amax=refiner.output.input_amax)

The steps only collect the calibration batches (no gradients); at the end of the epoch every rank
runs :func:`~pq_lightning.refine.refine_model` on its own windows, Hessians, token counts and amax are
reduced across ranks (the default process group that the strategy initialised), each Linear is
decided by one owner rank (balanced by GPTQ cost) and broadcast, and every rank holds the same
:class:`~pq_lightning.refine.RefineOutput` in :attr:`GPTQRefiner.output`.

Fit / held-out split: with two dataloaders, the first is fit and the second held-out. With one,
every ``heldout_every``-th batch (``batch_idx % heldout_every == heldout_every - 1``) is held out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning
import torch

from .flops import FlopTally
from .gptq import GPTQConfig
from .refine import RefineOutput, refine_model


def _batch_ids(batch: Any) -> torch.Tensor:
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
    if not isinstance(ids, torch.Tensor):
        raise ValueError(
            f"GPTQRefiner needs batches of token ids (a LongTensor or a dict with 'input_ids'), got {type(batch).__name__}"
        )
    return ids.detach()


class GPTQRefiner(lightning.LightningModule):
    """Collects calibration windows, then refines ``model`` per ``plan`` layer by layer.

    Args:
        model: the Hugging Face causal LM (left unchanged; the result is in :attr:`output`).
        plan: Linear name -> format name (e.g. ``Plan.formats``).
        config: what GPTQ tries (default :class:`GPTQConfig`).
        groups / gptq / fp8_gptq / rtn_errors / model_type / progress / max_resident_activation_bytes /
            spill_dir / count_flops_into: passed to :func:`refine_model`.
        heldout_every: with a single dataloader, every n-th batch is held out (must be >= 2).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Mapping[str, str],
        config: GPTQConfig | None = None,
        *,
        groups: Sequence[Sequence[str]] | None = None,
        gptq: bool = True,
        fp8_gptq: bool = False,
        rtn_errors: bool = False,
        model_type: str | None = None,
        heldout_every: int = 4,
        progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
        max_resident_activation_bytes: int | None = None,
        spill_dir: str | None = None,
        count_flops_into: FlopTally | None = None,
    ) -> None:
        super().__init__()
        if heldout_every < 2:
            raise ValueError(f"heldout_every must be >= 2 (every n-th batch is held out), got {heldout_every}")
        self.model = model
        self.plan = dict(plan)
        self.config = config or GPTQConfig()
        self.groups = None if groups is None else [list(g) for g in groups]
        self.gptq, self.fp8_gptq, self.rtn_errors, self.model_type = gptq, fp8_gptq, rtn_errors, model_type
        self.heldout_every = heldout_every
        self.progress = progress
        self.memory = {"max_resident_activation_bytes": max_resident_activation_bytes, "spill_dir": spill_dir}
        self.count_flops_into = count_flops_into
        self.output: RefineOutput | None = None
        self._batches: list[tuple[int, int, torch.Tensor]] = []

    # ---- collection ------------------------------------------------------------------------
    def _collect(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if dataloader_idx > 1:
            raise ValueError("GPTQRefiner takes at most two dataloaders: fit windows, then held-out windows")
        self._batches.append((dataloader_idx, batch_idx, _batch_ids(batch)))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, batch_idx, dataloader_idx)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, batch_idx, dataloader_idx)

    def on_predict_epoch_start(self) -> None:
        self._batches = []

    def on_validation_epoch_start(self) -> None:
        self._batches = []

    def on_predict_epoch_end(self) -> None:
        self._refine()

    def on_validation_epoch_end(self) -> None:
        self._refine()

    def teardown(self, stage: str) -> None:
        from .streaming import release_streamed_layers

        release_streamed_layers(self.model)

    # ---- refinement ------------------------------------------------------------------------
    def split_batches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The collected batches as (fit, held-out) lists, by the rule in the module docstring."""
        if any(d == 1 for d, _, _ in self._batches):
            fit = [ids for d, _, ids in self._batches if d == 0]
            held = [ids for d, _, ids in self._batches if d == 1]
        else:
            k = self.heldout_every
            fit = [ids for _, i, ids in self._batches if i % k != k - 1]
            held = [ids for _, i, ids in self._batches if i % k == k - 1]
        return fit, held

    def _refine(self) -> None:
        fit, held = self.split_batches()
        # Lightning runs predict/validate under inference mode; the walk swaps weights in and out,
        # so it runs outside it (the collected ids are cloned into normal tensors)
        with torch.inference_mode(False), torch.no_grad():
            fit, held = [t.clone() for t in fit], [t.clone() for t in held]
            self.output = refine_model(
                self.model, self.plan, fit, held, config=self.config, gptq=self.gptq,
                fp8_gptq=self.fp8_gptq, rtn_errors=self.rtn_errors, model_type=self.model_type, groups=self.groups,
                progress=self.progress, count_flops_into=self.count_flops_into, **self.memory,
            )
        self._batches = []


class SharedWalkRefiner(GPTQRefiner):
    """Refines several plans (a budget sweep) in one walk: :func:`~pq_lightning.shared_walk.refine_plans`.

    Run like :class:`GPTQRefiner`; :attr:`outputs` holds one :class:`~pq_lightning.refine.RefineOutput` per
    plan, in order. ``model`` must be unfolded: each :class:`~pq_lightning.shared_walk.WalkPlan` carries
    its own folds.
    """

    def __init__(self, model: torch.nn.Module, plans: Sequence[Any], config: GPTQConfig | None = None, **kwargs: Any):
        if not plans:
            raise ValueError("SharedWalkRefiner needs at least one WalkPlan")
        super().__init__(model, plans[0].formats, config, **kwargs)
        self.plans = list(plans)
        self.outputs: list[RefineOutput] | None = None

    def _refine(self) -> None:
        from .shared_walk import refine_plans

        fit, held = self.split_batches()
        with torch.inference_mode(False), torch.no_grad():  # as GPTQRefiner._refine
            fit, held = [t.clone() for t in fit], [t.clone() for t in held]
            self.outputs = refine_plans(
                self.model, self.plans, fit, held, config=self.config, gptq=self.gptq, fp8_gptq=self.fp8_gptq,
                rtn_errors=self.rtn_errors, model_type=self.model_type, progress=self.progress,
                count_flops_into=self.count_flops_into, **self.memory,
            )
        self.output = self.outputs[0]
        self._batches = []
