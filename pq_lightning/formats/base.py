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

and declares what the orchestrators (probe, refiner, export, served model) must do for it; they ask
these, never the format's class, so a format added with ``register_format`` works end to end:

* ``quantizes_weights`` / ``quantizes_activations``: passthrough (BF16), weight-only or W·A;
* ``static_input_scale``: the input is quantized under one calibrated scale stored on disk
  (``calibrate_input_global_scale``), rather than dynamically at run time;
* ``shares_global_scale``: fused siblings must share one per-tensor weight scale
  (``shared_global_scale``, passed to ``pack`` as ``global_scale=``);
* ``refine`` / ``refine_by_default``: a GPTQ-style refinement gated against RTN, if any;
* ``compact_weight``: ``Q(W)`` as byte codes decoded by table, for caches of many weights;
* ``smooth_inputs``: activation smoothing pays in front of this format.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from .code_grid import CodeGrid
from .compact import CompactWeight

if TYPE_CHECKING:  # gptq imports the formats: a type-only import avoids the cycle
    from ..gptq import GPTQConfig, RefineResult
    from ..input_error import InputErrors

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

    Subclasses set :attr:`name` (the registry key, lower case), :attr:`quantizes_weights`,
    :attr:`quantizes_activations` and whichever capability attributes apply (the defaults declare
    none: dynamic or no activation scales, siblings packed on their own, RTN only, fp32 caches), and
    implement the abstract methods. Weights are 2-D ``[out_features, in_features]``; every returned
    dequantised tensor is fp32.
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
    #: ``True`` when the input is quantized under one static scale calibrated offline and written as
    #: ``input_global_scale`` (NVFP4 W4A4), which :meth:`calibrate_input_global_scale` computes from
    #: the input amax: the refiner measures that amax before it builds the Hessians, the export needs
    #: ``input_amax``, the probe calibrates it per sequence. ``False`` for dynamic activation scales
    #: (FP8 per token: nothing to calibrate) and for weight-only formats.
    static_input_scale: bool = False
    #: ``True`` when fused siblings (q/k/v, gate/up: one matmul in vLLM) must share one per-tensor
    #: weight scale. :meth:`shared_global_scale` computes it from the siblings' weights; :meth:`pack`,
    #: :meth:`fake_quant` and :meth:`refine` then take it as ``global_scale=`` and :meth:`pack` writes
    #: it as the tensor :attr:`global_scale_tensor`.
    shares_global_scale: bool = False
    #: The name among :attr:`tensor_names` of the shared per-tensor weight scale (shape ``[1]``).
    global_scale_tensor: str = ""
    #: ``False`` when the refiner runs :meth:`refine` only on request (``refine_model(fp8_gptq=True)``):
    #: FP8 per channel keeps RTN unless asked. Irrelevant for a format without :meth:`refine`.
    refine_by_default: bool = True

    def check_declarations(self) -> None:
        """Raise ``ValueError`` when the declared capabilities contradict each other or the methods."""
        name = self.name or type(self).__name__
        if self.static_input_scale and not self.quantizes_activations:
            raise ValueError(f"{name}: static_input_scale needs quantizes_activations=True")
        calibrates = self.calibrate_input_global_scale(1.0) is not None
        if self.static_input_scale != calibrates:
            raise ValueError(
                f"{name}: static_input_scale={self.static_input_scale} but calibrate_input_global_scale "
                f"returns {'a scale' if calibrates else 'None'}; declare static_input_scale=True exactly "
                "when the format calibrates an input scale"
            )
        if self.shares_global_scale and self.global_scale_tensor not in self.tensor_names:
            raise ValueError(
                f"{name}: shares_global_scale needs global_scale_tensor to name one of tensor_names "
                f"{self.tensor_names}, got {self.global_scale_tensor!r}"
            )

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

    def pack_quantized(self, quantized) -> dict[str, torch.Tensor]:
        """The on-disk tensors of what :meth:`refine` chose (:attr:`RefineResult.quantized`), as given.

        The default takes ``quantized`` to be those tensors already (FP8's GPTQ returns them)."""
        return dict(quantized)

    def shared_global_scale(self, weights: Iterable[torch.Tensor]) -> torch.Tensor:
        """The one weight scale fused siblings share (``shares_global_scale`` formats only)."""
        raise NotImplementedError(
            f"{self.name} declares no shared weight scale (shares_global_scale=False); pack each Linear on its own"
        )

    def compact_weight(self, w: torch.Tensor) -> CompactWeight | None:
        """``fake_quant(w)`` as byte codes and scales (:class:`CompactWeight`), or ``None`` when the
        format has no such encoding (a cache then keeps the fp32 tensor)."""
        return None

    def code_grid(self, tensors: Mapping[str, torch.Tensor]) -> CodeGrid | None:
        """:meth:`pack`'s ``tensors`` as grid values times fixed scales (:class:`CodeGrid`), for moving
        codes with the scales held (norm and code tuning), or ``None`` when the format has no grid with
        even steps to move on (FP8's steps grow with the value; BF16 has no grid)."""
        return None

    def pack_grid(self, tensors: Mapping[str, torch.Tensor], values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``tensors`` with the codes replaced by ``values`` (points of :meth:`code_grid`'s grid), the
        scales as they were."""
        raise NotImplementedError(f"{self.name} has no code grid (code_grid returns None)")

    # ---- refinement ----------------------------------------------------------------------
    def refine(
        self,
        w: torch.Tensor,
        H_fit: torch.Tensor,
        H_heldout: torch.Tensor,
        *,
        config: GPTQConfig,
        global_scale: torch.Tensor | None = None,
        factor_cache: dict | None = None,
        H_refit: torch.Tensor | None = None,
        input_error: InputErrors | None = None,
    ) -> RefineResult | None:
        """GPTQ-style candidates for ``w`` fitted on ``H_fit`` and gated against RTN on ``H_heldout``
        (per-token input second moments of the served input), or ``None``: the format has no
        refinement and the refiner keeps RTN. ``global_scale``: the siblings' shared weight scale
        (``shares_global_scale``); ``factor_cache``: shared by siblings with one ``H_fit``;
        ``H_refit``: all calibration tokens, for :attr:`GPTQConfig.refit`; ``input_error``: the
        served input's quantization error, for :attr:`GPTQConfig.compensate_inputs`."""
        return None

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
