"""Evaluation: a quantized candidate against its reference, as a LightningModule over torchmetrics.

The candidate runs as served: a compressed-tensors checkpoint (ours or any other tool's) is
loaded with :func:`pq_lightning.served.load_quantized_checkpoint`, weights decoded exactly from
disk and activations quantized as its config says. Each window is teacher-forced through both
models; the distributions at positions ``0 … n-2`` (those that predict a token of the window) are
compared with :class:`pq_lightning.metrics.QuantEvalMetrics`. Under DDP each rank takes its share
of the windows and torchmetrics sums the states exactly.

``pq-lightning validate --config configs/eval-smollm2.yaml`` runs it from the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .atomic import atomic_write_text
from .metrics import QuantEvalMetrics

REPORT_KEYS = ("kl_all", "kl_conf", "kl_top20_conf", "top1_conf", "top1_all", "n_positions")


class QuantEvaluator(L.LightningModule):
    """KL divergence and top-1 agreement of ``candidate`` against ``reference``.

    Args:
        candidate: a compressed-tensors checkpoint folder (ours, llm-compressor's, ...).
        reference: the unquantized model: Hugging Face folder, hub id, ``.gguf`` file, or None
            for the embedded SmolLM2-135M-Instruct.
        reference_gguf_file: GGUF file name inside ``reference`` when it is a folder.
        dtype: dtype both models run in.
        top_k: k of the top-k KL (the seed's vLLM-logprob variant uses 20).
        confidence_threshold: reference top-1 probability above which a position is confident.
        output_dir: where ``eval.json`` and ``eval.md`` are written at the end (None: not written).
    """

    def __init__(
        self,
        candidate: str | None = None,
        reference: str | None = None,
        reference_gguf_file: str | None = None,
        dtype: str = "float32",
        top_k: int = 20,
        confidence_threshold: float = 0.5,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.save_hyperparameters()
        self.reference_model: Any = None
        self.candidate_model: Any = None
        self.metrics = QuantEvalMetrics(top_k=top_k, confidence_threshold=confidence_threshold)
        self.results: dict[str, float] = {}

    @classmethod
    def from_models(cls, reference_model, candidate_model, **kwargs) -> QuantEvaluator:
        """Evaluate two already-built models (e.g. the in-memory reference and a loaded checkpoint)."""
        ev = cls(**kwargs)
        ev.reference_model = reference_model
        ev.candidate_model = candidate_model
        return ev

    def configure_model(self) -> None:
        from .models import load_model, resolve_dtype
        from .served import load_quantized_checkpoint

        dtype = resolve_dtype(self.hparams.dtype)
        if self.reference_model is None:
            self.reference_model = load_model(
                self.hparams.reference, gguf_file=self.hparams.reference_gguf_file, dtype=dtype
            )
        if self.candidate_model is None:
            if self.hparams.candidate is None:
                raise ValueError("QuantEvaluator needs a candidate: the folder of a compressed-tensors checkpoint")
            self.candidate_model, _ = load_quantized_checkpoint(self.hparams.candidate, dtype=dtype)
        for m in (self.reference_model, self.candidate_model):
            m.eval()
            m.requires_grad_(False)

    def _logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        model.to(input_ids.device)
        return model(input_ids=input_ids, use_cache=False).logits[:, :-1]

    def validation_step(self, batch, batch_idx: int) -> None:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        with torch.no_grad():
            ref = self._logits(self.reference_model, ids)
            q = self._logits(self.candidate_model, ids)
            self.metrics.update(ref, q)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.metrics.compute().items()}
        self.metrics.reset()
        self.results = values
        self.log_dict({k: v for k, v in values.items() if not math.isnan(v)}, sync_dist=False)
        if self.hparams.output_dir and self.trainer.is_global_zero:
            write_eval(Path(self.hparams.output_dir), values)

    on_test_epoch_end = on_validation_epoch_end


def write_eval(out_dir: Path, values: dict[str, float]) -> None:
    """``eval.json`` and a markdown table ``eval.md``, atomically."""
    atomic_write_text(out_dir / "eval.json", json.dumps(values, indent=1) + "\n")
    keys = [k for k in REPORT_KEYS if k in values] + [k for k in values if k not in REPORT_KEYS]
    table = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + " | ".join(
        f"{values[k]:.6g}" for k in keys
    ) + " |\n"
    atomic_write_text(out_dir / "eval.md", table)


def evaluate_models(
    reference_model, candidate_model, windows: torch.Tensor, *, batch_size: int = 2, top_k: int = 20,
    accelerator: str = "cpu", output_dir: str | None = None,
) -> dict[str, float]:
    """Run :class:`QuantEvaluator` through ``Trainer.validate`` over ``windows`` ``[n, T]``."""
    from torch.utils.data import DataLoader

    from .data import WindowDataset

    ev = QuantEvaluator.from_models(reference_model, candidate_model, top_k=top_k, output_dir=output_dir)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    loader = DataLoader(WindowDataset(windows), batch_size=batch_size, shuffle=False)
    trainer.validate(ev, dataloaders=loader, verbose=False)
    out = dict(ev.results)
    out["n_positions"] = int(out.get("n_positions", 0))
    return out


def evaluate_checkpoint(
    reference_model, checkpoint: str | Path, windows: torch.Tensor, *, batch_size: int = 2, top_k: int = 20,
    accelerator: str = "cpu",
) -> dict[str, float]:
    """Load ``checkpoint`` as served and evaluate it against the in-memory ``reference_model``."""
    from .served import load_quantized_checkpoint

    dtype = next(reference_model.parameters()).dtype
    candidate, _ = load_quantized_checkpoint(checkpoint, dtype=dtype)
    try:
        return evaluate_models(
            reference_model, candidate, windows, batch_size=batch_size, top_k=top_k, accelerator=accelerator,
        )
    finally:
        del candidate
