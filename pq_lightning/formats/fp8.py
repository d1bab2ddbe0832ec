"""FP8 E4M3 weights with one scale per output channel (compressed-tensors ``float-quantized``).

* weight scale ``s_o = bf16(amax(W[o, :]) / 448)``: computed in fp32, then rounded to the nearest
  BF16 value (a zero scale replaced by fp32's eps, also a BF16 value). Stored as ``weight_scale``
  ``[out, 1]`` float32, but every value is exactly representable in BF16, so a loader that keeps
  scales in the model dtype (transformers casts them to BF16) and one that keeps FP32 (vLLM) decode
  the same weights, bit for bit; it is also the scale compressed-tensors computes for a BF16
  model. Weight ``fp8(W / s)`` (division in fp32) stored as ``weight``;
* ``FP8`` (W8A8): the input is quantized per token at run time, ``s_t = amax(x_t) / 448``;
* ``FP8W8A16``: weight-only, activations stay BF16 (served by the FP8 Marlin kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .base import QuantFormat, Shape, check_finite
from .compact import CompactWeight

if TYPE_CHECKING:
    from ..gptq import GPTQConfig, RefineResult
    from ..input_error import InputErrors

FP8_E4M3_MAX = 448.0
_FP32_EPS = float(torch.finfo(torch.float32).eps)


def fp8_round(scaled: torch.Tensor) -> torch.Tensor:
    """Clamp to ±448 and round to the nearest FP8 E4M3 value (stays in fp8 dtype)."""
    return torch.clamp(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def weight_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Per-channel weight scale: ``absmax_scale`` rounded to the nearest BF16 value, kept in fp32.

    Rounding to nearest (not up) is what compressed-tensors does for a BF16 model; the largest
    weight of a row may then land a hair above 448 and is clamped, an error below 2^-9 relative.
    """
    s = absmax_scale(amax).to(torch.bfloat16).float()
    # a tiny amax whose scale underflows BF16's normal range still gets a nonzero scale
    return torch.where(s == 0, torch.full_like(s, _FP32_EPS), s)


def absmax_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` in fp32 with zeros replaced by fp32's eps (compressed-tensors' rule)."""
    s = amax.float() / FP8_E4M3_MAX
    return torch.where(s == 0, torch.full_like(s, _FP32_EPS), s)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 (one scale ``amax(x_t) / 448`` per row of the last dimension), in fp32."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf: a row's worth to check, not x
        check_finite(x, "FP8 activation")
    s = absmax_scale(amax)
    return (fp8_round(xf / s).float() * s).to(x.dtype)


@functools.cache
def fp8_byte_values(device: torch.device) -> torch.Tensor:
    """The FP8 E4M3 value of each byte ``[256, 1]`` (NaN bytes, never written, as 0)."""
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return byte.view(torch.float8_e4m3fn).float().nan_to_num(0.0).reshape(256, 1).to(device)


class FP8(QuantFormat):
    """W8A8 FP8: per-channel weights, dynamic per-token activations (``FP8_DYNAMIC``)."""

    name = "fp8"
    quantizes_activations = True
    tensor_names = ("weight", "weight_scale")
    refine_by_default = False

    def bits(self, shape: Shape) -> int:
        out, inp = int(shape[0]), int(shape[1])
        return out * inp * 8 + out * 32

    def weight_scale(self, w: torch.Tensor) -> torch.Tensor:
        return weight_scale_from_amax(w.detach().abs().amax(dim=1, keepdim=True))

    def pack(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check_weight(w)
        w = w.detach()
        s = self.weight_scale(w) if scale is None else scale.float().reshape(-1, 1)
        return {"weight": fp8_round(w.float() / s), "weight_scale": s}

    def unpack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = tensors["weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 weights must be float8_e4m3fn on disk, got {w.dtype}")
        return w.float() * tensors["weight_scale"].float().reshape(-1, 1)

    def compact_weight(self, w: torch.Tensor) -> CompactWeight:
        """FP8 codes (a byte per weight) and row scales, as :meth:`pack` writes them."""
        t = self.pack(w)
        return CompactWeight(
            codes=t["weight"].view(torch.uint8), table=fp8_byte_values(w.device),
            scale=t["weight_scale"].float().reshape(-1, 1),
        )

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
    ) -> RefineResult:
        """RTN against GPTQ at each damping under the RTN row scales (:func:`pq_lightning.gptq.refine_fp8`)."""
        from ..gptq import refine_fp8

        return refine_fp8(w, H_fit, H_heldout, config=config, H_refit=H_refit, input_error=input_error)

    def fake_quant_activation(
        self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token dynamic FP8 (one scale per row of the last dimension), computed in fp32."""
        if not self.quantizes_activations:
            return x
        return fake_quant_per_token(x)

    def scheme(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

        preset = preset_name_to_scheme("FP8_DYNAMIC", targets)
        if self.quantizes_activations:
            return preset
        return QuantizationScheme(targets=targets, weights=preset.weights)


class FP8W8A16(FP8):
    """Weight-only FP8 per-channel (activations stay BF16)."""

    name = "fp8_w8a16"
    quantizes_activations = False


class BF16(QuantFormat):
    """Passthrough: the Linear stays in BF16 and is listed in the config's ``ignore``."""

    name = "bf16"
    quantizes_weights = False
    tensor_names = ("weight",)

    def bits(self, shape: Shape) -> int:
        return int(shape[0]) * int(shape[1]) * 16

    def pack(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_weight(w)
        return {"weight": w.detach().to(torch.bfloat16)}

    def unpack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float()

    def scheme(self, targets: list[str]):
        return None
