"""``FisherProbe``: measure per-Linear Fisher sensitivity during any Lightning training run.

Attach it to ``Trainer.fit`` of a :class:`~pq_lightning.causal_lm.CausalLM` in probe-only mode (no
weight updates) or to any fine-tuning run; it changes neither losses nor weights. For every tracked
Linear a forward hook keeps the (detached) input ``x`` and puts a hook on the output tensor; when
the backward pass reaches that output, the hook combines ``x`` with the received gradient ``g``
into the per-token statistics of :mod:`pq_lightning.fisher` and lets ``x`` go. Parameter ``.grad``
is never read, so the probe works when weights have no gradient and under DDP (whose ``.grad`` is
averaged over ranks: the module hooks see this rank's own gradients before any averaging).

Gradient of the sum-reduced loss. The LightningModule's loss is the *mean* over
``pl_module.last_token_count`` tokens; in automatic optimisation Lightning divides it by
``trainer.accumulate_grad_batches``; under fp16 mixed precision the grad scaler multiplies it by its
scale. The hook therefore uses ``g_sum = g_seen × last_token_count × accumulate_grad_batches /
scaler_scale``. A batch whose gradients overflowed (non-finite values) is dropped whole.

Only training batches count (hooks are live between ``on_train_batch_start`` and
``on_train_batch_end`` and only with grad enabled), never validation or the sanity check. Sums are
the callback's checkpoint state, so a resumed run continues them. At ``on_train_end`` every rank
takes part in one sum-reduce, rank zero writes the sensitivity file atomically, and every rank keeps
the finalized :class:`~pq_lightning.sensitivity.Sensitivity` as ``probe.sensitivity``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from pq_lightning.fisher import ACTIVATION_SCALE_RULE, FisherAccumulator, quantized_output_error
from pq_lightning.formats import get_format
from pq_lightning.sensitivity import Sensitivity, default_meta, save_sensitivity


class FisherProbe(Callback):
    """Per-token empirical Fisher statistics of the model's body Linears, written to a sensitivity file.

    Args:
        output_path: where rank zero writes the sensitivity file (safetensors) at the end of training.
        include: regexes (``re.search`` on full Linear names of ``pl_module.model``) selecting the
            Linears to track; ``None`` tracks the language-model body (see
            :func:`pq_lightning.models.find_body_linears`).
        exclude: regexes of Linears to leave out.
        formats: the format menu whose output-space error (activation quantisation included) is
            measured; a Linear gets only the formats that support its shape.
        output_error: measure the per-format output-space error (one extra matmul per format per
            Linear per step). ``False`` measures only the trace and the diagonals.
        max_tokens: stop counting once this many loss tokens have been counted (the batch that
            crosses the limit is counted whole); ``None`` counts every training batch.
    """

    def __init__(
        self,
        output_path: str = "sensitivity.safetensors",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        formats: Sequence[str] = ("nvfp4", "fp8"),
        output_error: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(output_path, (str, Path)) or not str(output_path):
            raise ValueError(f"output_path must be a non-empty file path, got {output_path!r}")
        self.output_path = str(output_path)
        self.include = self._check_regexes(include, "include")
        self.exclude = self._check_regexes(exclude, "exclude")
        if isinstance(formats, str):
            formats = [formats]
        names = []
        for f in formats:
            try:
                names.append(get_format(f).name)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
        if len(set(names)) != len(names):
            raise ValueError(f"formats lists a format twice: {list(formats)}")
        self.formats = names
        self.output_error = bool(output_error)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        self.max_tokens = None if max_tokens is None else int(max_tokens)

        self.sensitivity: Sensitivity | None = None
        self.accumulator: FisherAccumulator | None = None
        self._linears: dict[str, torch.nn.Linear] = {}
        self._handles: list[Any] = []
        self._loaded_state: dict | None = None
        self._model_fingerprint: str | None = None
        self._qweights: dict[tuple[str, str], tuple[torch.Tensor, int, int]] = {}
        self._active = False
        self._grad_scale: float | None = None
        self._batch_tokens = 0
        self._batch: Any = None
        self._warned_no_scale = False

    @staticmethod
    def _check_regexes(patterns: list[str] | None, what: str) -> list[str] | None:
        if patterns is None:
            return None
        if isinstance(patterns, str):
            patterns = [patterns]
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"{what} regex {p!r} is not a valid regular expression: {err}") from err
        return list(patterns)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_path=self.output_path)

    @property
    def counting(self) -> bool:
        """Whether the probe still counts batches (``max_tokens`` not reached)."""
        if self.max_tokens is None or self.accumulator is None:
            return True
        return self.accumulator.n_tokens < self.max_tokens

    # ---- setup / teardown ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        from pq_lightning.models import find_body_linears

        model = getattr(pl_module, "model", pl_module)
        self._linears = find_body_linears(model, self.include, self.exclude)
        self._remove_hooks()
        for name, module in self._linears.items():
            self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))

    @staticmethod
    def _check_strategy(trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                "FisherProbe does not support FSDP yet (sharded Linears need the per-token hooks on "
                "unsharded weights; support is planned). Run the probe with strategy='ddp' or on one device."
            )
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"FisherProbe supports single-device and DDP strategies (ddp, ddp_spawn), got "
                f"{type(strategy).__name__}; run the probe with strategy='ddp' or on one device."
            )

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._qweights = {}
        self._active = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._linears:
            return
        device = next(iter(self._linears.values())).weight.device
        shapes = {n: tuple(m.weight.shape) for n, m in self._linears.items()}
        self.accumulator = FisherAccumulator(shapes, self.formats if self.output_error else (), device=device)
        if self._loaded_state is not None:
            self.accumulator.load_state_dict(self._loaded_state["sums"])
            self._model_fingerprint = self._loaded_state.get("model_fingerprint")
            self._loaded_state = None
        if self._model_fingerprint is None:
            from pq_lightning.models import model_fingerprint

            self._model_fingerprint = model_fingerprint(getattr(pl_module, "model", pl_module))

    # ---- per batch -----------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active = self.accumulator is not None and self.counting
        self._grad_scale = None
        self._batch_tokens = 0
        self._batch = batch

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self._active:
            return
        n = self._token_count(pl_module, self._batch)
        accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._grad_scale = n * accumulate / scale
        self._batch_tokens += n

    @staticmethod
    def _token_count(pl_module: pl.LightningModule, batch: Any) -> int:
        """Loss tokens of the current step: ``pl_module.last_token_count``, else counted from labels."""
        n = getattr(pl_module, "last_token_count", None)
        if n is not None:
            return int(n)
        if isinstance(batch, dict):
            if batch.get("labels") is not None:
                return int((batch["labels"][..., 1:] != -100).sum())
            if batch.get("attention_mask") is not None:
                return int(batch["attention_mask"][..., 1:].sum())
            if batch.get("input_ids") is not None:
                ids = batch["input_ids"]
                return int(ids[..., 1:].numel())
        raise ValueError(
            "FisherProbe needs the number of loss tokens of each step: set `self.last_token_count` in "
            "training_step (the loss must be the mean over those tokens) or pass batches as dicts with "
            "`labels` (ignore_index -100) or `input_ids`."
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.accumulator is not None and (self.accumulator.has_pending or self._batch_tokens):
            if not self.accumulator.commit(self._batch_tokens):
                warnings.warn(
                    f"FisherProbe: batch {batch_idx} had non-finite gradients (fp16 overflow?) and was not counted",
                    stacklevel=2,
                )
        self._active = False
        self._grad_scale = None
        self._batch = None

    # ---- hooks ---------------------------------------------------------------------------
    def _make_forward_hook(self, name: str):
        def forward_hook(module: torch.nn.Linear, args: tuple, output: Any) -> None:
            if not self._active or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return
            x = args[0].detach()
            y = output.detach() if output.dtype == torch.float32 and self.output_error else None
            holder = [x, x._version, y, None if y is None else y._version]
            output.register_hook(self._make_backward_hook(name, module, holder))

        return forward_hook

    def _make_backward_hook(self, name: str, module: torch.nn.Linear, holder: list):
        def backward_hook(grad: torch.Tensor) -> None:
            if not holder:
                return None
            x, x_version, y, y_version = holder
            holder.clear()  # drop x (and y) now
            if self._grad_scale is None:
                if not self._warned_no_scale:
                    warnings.warn(
                        "FisherProbe: a backward pass ran without Lightning's on_before_backward "
                        "(call self.manual_backward, not loss.backward); it is not counted",
                        stacklevel=2,
                    )
                    self._warned_no_scale = True
                return None
            if x._version != x_version:
                raise RuntimeError(
                    f"FisherProbe: the input of {name} was modified in place after the forward pass; "
                    "exclude this Linear (exclude=[...]) or avoid the in-place operation."
                )
            with torch.no_grad():
                errs = {}
                if self.output_error:
                    formats = self.accumulator.linear_formats[name]
                    if y is not None and y._version == y_version:
                        y_lin = y if module.bias is None else y - module.bias.detach()
                    else:
                        y_lin = None
                    if formats and y_lin is None:
                        y_lin = x.float() @ module.weight.detach().float().t()
                    for f in formats:
                        fmt = get_format(f)
                        errs[f] = quantized_output_error(
                            x, module.weight, self._qweight(name, module, fmt), fmt, y=y_lin
                        )
                self.accumulator.update(name, x, grad, errs, grad_scale=self._grad_scale)
            return None

        return backward_hook

    def _qweight(self, name: str, module: torch.nn.Linear, fmt) -> torch.Tensor:
        """``fmt.fake_quant(W)``, cached; recomputed only when the weight changed (fine-tuning)."""
        w = module.weight
        key = (name, fmt.name)
        cached = self._qweights.get(key)
        if cached is not None and cached[1] == w._version and cached[2] == w.data_ptr():
            return cached[0]
        q = fmt.fake_quant(w.detach()).float()
        self._qweights[key] = (q, w._version, w.data_ptr())
        return q

    # ---- end -----------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.accumulator is None:
            return
        self.accumulator.discard_pending()
        reduced = self.accumulator.all_reduce()  # a collective: every rank calls it
        data_fp = None
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "fingerprint", None)):
            data_fp = dm.fingerprint()
        meta = default_meta(
            model_fingerprint=self._model_fingerprint,
            data_fingerprint=data_fp,
            world_size=trainer.world_size,
            estimator={
                "gradient": "per-token gradient of the sum-reduced loss (empirical Fisher)",
                "output_error": self.output_error,
                "activation_global_scale": ACTIVATION_SCALE_RULE,
                "include": self.include,
                "exclude": self.exclude,
                "max_tokens": self.max_tokens,
            },
        )
        self.sensitivity = reduced.finalize(meta)
        if trainer.is_global_zero:
            save_sensitivity(self.sensitivity, self.output_path)
        trainer.strategy.barrier("fisher_probe_written")

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.accumulator is None:
            return dict(self._loaded_state) if self._loaded_state is not None else {}
        return {"sums": self.accumulator.state_dict(), "model_fingerprint": self._model_fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.accumulator is not None:
            self.accumulator.load_state_dict(state_dict["sums"])
            self._model_fingerprint = state_dict.get("model_fingerprint")
        else:
            self._loaded_state = dict(state_dict)
