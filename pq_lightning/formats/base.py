"""The format interface: one object per quantization format, used by every stage.

Cost, the Fisher probe's output-space error, GPTQ, evaluation and export all call the same
object, so the allocator prices exactly the bytes that land on disk and the evaluation runs the
model exactly as it is served.

A format knows, for a Linear weight ``W [out, in]`` and its inputs ``x [..., in]``:

* ``pack(W)``: the exact tensors written to disk, under compressed-tensors' names;
* ``unpack(tensors)``: the served weight (fp32) decoded from those tensors;
* ``fake_quant(W)``: ``unpack(pack(W))`` computed directly;
* ``fake_quant_activation(x)``: what the serving kernel does to the Linear's input;
* ``bits(shape)``: exact bits on disk for that Linear (weights and every scale);
* ``scheme(targets)``: the compressed-tensors ``QuantizationScheme`` for ``config.json``;
* ``unsupported_reason(shape)``: why a shape cannot take this format (``None`` when it can).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

Shape = Sequence[int]


class NonFiniteTensorError(ValueError):
    """A weight or activation holds NaN or Inf; packing it would write garbage."""


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteTensorError` naming ``what`` when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteTensorError(
            f"{what} holds {n_nan} NaN and {n_inf} Inf values (shape {tuple(t.shape)}); "
            "quantizing it would write garbage. Check the checkpoint or the calibration data "
            "for overflow (e.g. run the model in bfloat16 or float32 rather than float16)."
        )


class QuantFormat(ABC):
    """A quantization format for a Linear layer (weights and, optionally, activations).

    Subclasses set :attr:`name` (the registry key, lower case), :attr:`quantizes_weights` and
    :attr:`quantizes_activations`, and implement the abstract methods. Weights are 2-D
    ``[out_features, in_features]``; every returned dequantised tensor is fp32.
    """

    name: str = ""
    #: ``False`` for a passthrough format such as BF16 (listed in the config's ``ignore``).
    quantizes_weights: bool = True
    #: ``True`` when the serving kernel quantizes the Linear's input too (W4A4, W8A8).
    quantizes_activations: bool = False
    #: ``True`` when the input is quantized in small groups under one static scale (NVFP4 W4A4), where
    #: moving activation range into the weights pays (:mod:`pq_lightning.smooth`). Per-token FP8
    #: activations have the range already, and per-row FP8 weight scales cannot take column outliers.
    smooth_inputs: bool = False
    #: Names of the tensors :meth:`pack` writes for one Linear, in compressed-tensors' spelling.
    tensor_names: tuple[str, ...] = ()

    # ---- shape support -------------------------------------------------------------------
    def unsupported_reason(self, shape: Shape) -> str | None:
        """Why a ``[out, in]`` weight cannot take this format, or ``None`` when it can."""
        if len(shape) != 2 or min(shape) < 1:
            return f"{self.name} needs a 2-D weight with positive dimensions, got {tuple(shape)}"
        return None

    def supports(self, shape: Shape) -> bool:
        return self.unsupported_reason(shape) is None

    def _check_weight(self, w: torch.Tensor, what: str = "weight") -> None:
        reason = self.unsupported_reason(tuple(w.shape))
        if reason is not None:
            raise ValueError(f"{what}: {reason}")
        check_finite(w, what)

    # ---- sizes ---------------------------------------------------------------------------
    @abstractmethod
    def bits(self, shape: Shape) -> int:
        """Exact bits on disk of one Linear of this shape: weights plus every scale tensor."""

    def bits_per_weight(self, shape: Shape) -> float:
        return self.bits(shape) / math.prod(shape)

    # ---- weights -------------------------------------------------------------------------
    @abstractmethod
    def pack(self, w: torch.Tensor, **params: torch.Tensor) -> dict[str, torch.Tensor]:
        """The exact on-disk tensors of ``w`` under compressed-tensors' names and dtypes."""

    @abstractmethod
    def unpack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The served weight (fp32) decoded from :meth:`pack`'s tensors."""

    def fake_quant(self, w: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        """The dequantised weight (fp32), exactly as served. Equals ``unpack(pack(w))``."""
        return self.unpack(self.pack(w, **params))

    def weight_mse(self, w: torch.Tensor) -> float:
        """Mean squared reconstruction error of the weight, computed in fp32."""
        err = self.fake_quant(w) - w.float()
        return float(err.pow(2).mean())

    # ---- activations ---------------------------------------------------------------------
    def fake_quant_activation(
        self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the serving kernel does to the Linear's input (identity for weight-only)."""
        return x

    def calibrate_input_global_scale(self, amax: torch.Tensor | float) -> torch.Tensor | None:
        """The static activation global scale stored on disk for an observed input amax.

        ``None`` for formats whose activations need no calibrated parameter.
        """
        return None

    # ---- config --------------------------------------------------------------------------
    @abstractmethod
    def scheme(self, targets: list[str]):
        """The compressed-tensors ``QuantizationScheme`` describing this format."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
