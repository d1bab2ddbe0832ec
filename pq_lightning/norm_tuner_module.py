"""``NormTuner``: norm tuning as a LightningModule (a thin adapter over :mod:`pq_lightning.norm_tune`).

Run it with ``trainer.fit`` on the calibration windows; ``trainer.validate`` on held-out windows
gives ``KL(reference ‖ quantized)`` there (before and after), in :attr:`NormTuner.heldout_kl`::

    student = served_student(model, plan.formats, refined.packed, refined.input_amax, plan.groups)
    tuner = NormTuner(model, student, tunable_norms(model, "model.layers", "model.norm"), lr=5e-3)
    trainer = lightning.Trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.validate(tuner, heldout_loader); before = tuner.heldout_kl
    trainer.fit(tuner, fit_loader)
    trainer.validate(tuner, heldout_loader); after = tuner.heldout_kl
    weights = tuner.weights()  # norm name + ".weight" -> tuned tensor, for the checkpoint

Under DDP only the gain parameters take gradients (a few tens of thousands of numbers), so the
all-reduce is cheap (with ``codes`` every NVFP4 weight value is reduced too); the held-out KL is
summed over ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import torch
from torch import nn

from .norm_tune import attach_gains, kl_to_reference, tuned_weights


def _ids(batch: Any) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, Mapping) else batch


class NormTuner(lightning.LightningModule):
    """Fit the norm gains of ``student`` (a served copy of ``reference``) to ``reference``'s logits.

    Args:
        reference: the unquantized model (frozen; its logits are the target).
        student: the quantized model as served (:func:`~pq_lightning.norm_tune.served_student`).
        norms: norm name -> gain offset (:func:`~pq_lightning.norm_tune.tunable_norms`).
        lr: Adam's step on ``θ`` (a relative change of each gain per step), cosine-annealed to zero.
        codes: Linear name -> its :class:`~pq_lightning.norm_tune.CodeShift` (attached to ``student`` by
            :func:`~pq_lightning.norm_tune.attach_code_shifts`): grid values tuned beside the gains.
        codes_lr: Adam's step on the grid values (in units of each group's scale), cosine-annealed to zero.
    """

    def __init__(self, reference: nn.Module, student: nn.Module, norms: Mapping[str, float], *, lr: float,
                 codes: Mapping[str, Any] | None = None, codes_lr: float = 0.0) -> None:
        super().__init__()
        if not norms:
            raise ValueError("NormTuner: no norm to tune (none found under the decoder layers)")
        if not lr > 0:
            raise ValueError(f"NormTuner: lr must be > 0, got {lr}")
        self.reference = reference.eval()
        self.student = student.eval()
        self.gains = nn.ModuleDict({k.replace(".", "/"): v for k, v in attach_gains(student, norms).items()})
        if codes and not codes_lr > 0:
            raise ValueError(f"NormTuner: codes to tune need codes_lr > 0, got {codes_lr}")
        self.lr = lr
        self.codes = dict(codes or {})  # modules of the student already: not registered twice
        self.codes_lr = codes_lr
        self.heldout_kl: float | None = None
        self._sum = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    def on_train_epoch_start(self) -> None:
        self.reference.eval()  # fit() puts every submodule in train mode; no dropout here
        self.student.eval()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = kl_to_reference(self.reference, self.student, _ids(batch))
        self.log("tune_kl", loss.detach(), prog_bar=True, on_step=True, batch_size=_ids(batch).shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids = _ids(batch)
        self._sum += float(kl_to_reference(self.reference, self.student, ids)) * ids.numel()
        self._count += ids.numel()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._count, reduce_op="sum")
        self.heldout_kl = float(total / count) if float(count) else None

    def configure_optimizers(self) -> Any:
        groups = [{"params": list(self.gains.parameters()), "lr": self.lr}]
        if self.codes:
            groups.append({"params": [c.values for c in self.codes.values()], "lr": self.codes_lr})
        opt = torch.optim.Adam(groups)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def weights(self) -> dict[str, torch.Tensor]:
        """Norm name + ``.weight`` -> its tuned value (the original dtype)."""
        return tuned_weights(self.student, {k.replace("/", "."): v for k, v in self.gains.items()})
