"""LightningCLI of ``pq-lightning fit|validate|test|predict``, with the evaluation's data following its model.

``data.tokenizer: null`` under ``validate`` / ``test`` with a :class:`QuantEvaluator` means the
reference model's own tokenizer (the windows must be that model's tokens), not the default SmolLM2's.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


class PQLightningCLI(LightningCLI):
    def _tokenizer_from_reference(self) -> None:
        from .data import EvalData
        from .evaluate import QuantEvaluator

        model, data = self.model, self.datamodule
        if not (isinstance(model, QuantEvaluator) and isinstance(data, EvalData)):
            return
        if data.tokenizer_name is None and data._tokenizer is None:
            data.tokenizer_name = model.hparams.reference
            data.gguf_file = model.hparams.reference_gguf_file

    def before_validate(self) -> None:
        self._tokenizer_from_reference()

    def before_test(self) -> None:
        self._tokenizer_from_reference()
