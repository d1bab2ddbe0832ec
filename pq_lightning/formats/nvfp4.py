"""NVFP4: E2M1 weights in groups of 16 with FP8 E4M3 group scales and a per-tensor global scale.

Numerics are those of compressed-tensors and vLLM (all in fp32):

* global scale ``gs = 448 * 6 / amax(W)`` (1.0 when ``W`` is all zero);
* group scale ``s = fp8_e4m3(gs * (amax_group / 6))``, a zero scale replaced by FP8's eps (0.125);
* code ``q = round_e2m1(W / (s / gs))`` (ties to even, sign kept), served value ``q * (s / gs)``.

``NVFP4`` (W4A4) also quantizes the Linear's input at run time: per 16 input channels of every
token, a dynamic FP8 group scale under a static, calibrated ``input_global_scale``.
``NVFP4A16`` is the weight-only variant (what Hopper serves through its Marlin kernels).

GPTQ chooses codes and scales itself: :meth:`NVFP4.quantize` takes given scales, and
:meth:`NVFP4.pack_quantized` writes exactly what it is given, re-deriving nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import QuantFormat, Shape, check_finite
from .code_grid import CodeGrid
from .compact import CompactWeight
from .e2m1 import E2M1_MAX, e2m1_codes, e2m1_decode, e2m1_round, pack_codes, unpack_codes

if TYPE_CHECKING:
    from ..gptq import GPTQConfig, RefineResult
    from ..input_error import InputErrors

FP8_E4M3_MAX = 448.0
#: What compressed-tensors puts in place of a zero FP8 scale (``finfo(float8_e4m3fn).eps``).
FP8_SCALE_EPS = float(torch.finfo(torch.float8_e4m3fn).eps)
GROUP_SIZE = 16


@dataclass
class NVFP4Weight:
    """The exact quantized state of one NVFP4 Linear: what is packed is what is served."""

    codes: torch.Tensor  # uint8 [out, in], sign << 3 | e2m1 index
    scale: torch.Tensor  # float8_e4m3fn [out, in // 16]
    global_scale: torch.Tensor  # float32 [1]

    def dequantize(self) -> torch.Tensor:
        eff = self.scale.float() / self.global_scale.float()
        values = e2m1_decode(self.codes).unflatten(-1, (-1, GROUP_SIZE))
        return (values * eff.unsqueeze(-1)).flatten(-2)


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """``448 * 6 / amax`` in fp32, shape ``[1]``; 1.0 for a zero (or non-finite) amax."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny)
    gs = (FP8_E4M3_MAX * E2M1_MAX) / amax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)


def fp8_group_scales(group_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """FP8 group scales ``fp8(gs * (amax / 6))`` with zero scales replaced by FP8's eps."""
    s = global_scale.float() * (group_amax.float() / E2M1_MAX)
    s = torch.clamp(s, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    # a Python eps, not a tensor built per call: on a GPU that is a host-to-device copy that waits
    # for the stream, in every 16 columns of GPTQ and every activation fake-quant
    return torch.where(s == 0, FP8_SCALE_EPS, s).to(torch.float8_e4m3fn)


def _groups(t: torch.Tensor) -> torch.Tensor:
    return t.float().unflatten(-1, (-1, GROUP_SIZE))


@functools.cache
def _byte_pairs(device: torch.device) -> torch.Tensor:
    """The two E2M1 values of each packed byte ``[256, 2]``, in the order ``unpack_codes`` puts them."""
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return e2m1_decode(unpack_codes(byte.reshape(256, 1))).to(device)


class NVFP4(QuantFormat):
    """W4A4 NVFP4, group 16 (compressed-tensors ``nvfp4-pack-quantized``)."""

    name = "nvfp4"
    quantizes_activations = True
    smooth_inputs = True
    tensor_names = ("weight_packed", "weight_scale", "weight_global_scale")
    group_size = GROUP_SIZE
    static_input_scale = True
    shares_global_scale = True
    global_scale_tensor = "weight_global_scale"

    def unsupported_reason(self, shape: Shape) -> str | None:
        reason = super().unsupported_reason(shape)
        if reason is None and shape[1] % GROUP_SIZE:
            reason = (
                f"{self.name} needs in_features divisible by {GROUP_SIZE}, got {shape[1]} "
                "(the serving kernels cannot take it; the Linear falls back to another format)"
            )
        return reason

    def bits(self, shape: Shape) -> int:
        out, inp = int(shape[0]), int(shape[1])
        # packed codes + FP8 group scales + fp32 weight_global_scale (+ fp32 input_global_scale)
        return out * inp * 4 + out * (inp // GROUP_SIZE) * 8 + 32 + (32 if self.quantizes_activations else 0)

    # ---- scales --------------------------------------------------------------------------
    def global_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-tensor global scale of ``w`` (fused siblings pass a shared one instead)."""
        return global_scale_from_amax(w.detach().abs().amax().float())

    def shared_global_scale(self, weights: Iterable[torch.Tensor]) -> torch.Tensor:
        """``448 * 6 / amax`` over all the siblings' weights (vLLM's fused matmul takes one)."""
        amax = torch.stack([w.detach().abs().amax().float() for w in weights])
        return global_scale_from_amax(amax.amax())

    def group_scales(self, w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """RTN FP8 group scales of ``w`` under ``global_scale``: ``[out, in // 16]`` float8."""
        return fp8_group_scales(_groups(w).abs().amax(-1), global_scale)

    # ---- weights -------------------------------------------------------------------------
    def quantize(
        self,
        w: torch.Tensor,
        global_scale: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> NVFP4Weight:
        """Round ``w`` to codes under the given (or RTN-derived) global and group scales."""
        self._check_weight(w)
        w = w.detach()
        gs = self.global_scale(w) if global_scale is None else global_scale.float().reshape(1).to(w.device)
        if scale is None:
            scale = self.group_scales(w, gs)
        elif scale.dtype != torch.float8_e4m3fn:
            raise ValueError(f"NVFP4 group scales must be float8_e4m3fn, got {scale.dtype}")
        eff = scale.float() / gs
        codes = e2m1_codes(_groups(w) / eff.unsqueeze(-1)).flatten(-2)
        return NVFP4Weight(codes=codes, scale=scale, global_scale=gs)

    def pack_quantized(self, q: NVFP4Weight) -> dict[str, torch.Tensor]:
        """The on-disk tensors of an already-quantized weight, written exactly as given."""
        return {
            "weight_packed": pack_codes(q.codes),
            "weight_scale": q.scale,
            "weight_global_scale": q.global_scale.float().reshape(1),
        }

    def pack(
        self,
        w: torch.Tensor,
        global_scale: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        from ..kernels import triton_kernels_enabled

        if triton_kernels_enabled(w) and scale is None:
            from ..kernels.nvfp4_triton import nvfp4_quantize_triton

            self._check_weight(w)
            gs = self.global_scale(w) if global_scale is None else global_scale.float().reshape(1)
            packed, scales, _ = nvfp4_quantize_triton(w.detach(), gs.to(w.device), want_dequant=False)
            return {"weight_packed": packed, "weight_scale": scales, "weight_global_scale": gs.to(w.device)}
        return self.pack_quantized(self.quantize(w, global_scale, scale))

    def unpack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        try:
            packed = tensors["weight_packed"]
            scale = tensors["weight_scale"]
            gs = tensors["weight_global_scale"]
        except KeyError as e:
            raise KeyError(f"NVFP4 tensors need {self.tensor_names}, missing {e}") from None
        q = NVFP4Weight(codes=unpack_codes(packed), scale=scale.to(torch.float8_e4m3fn), global_scale=gs.float())
        return q.dequantize()

    def fake_quant(
        self,
        w: torch.Tensor,
        global_scale: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from ..kernels import compiled_cpu_enabled, triton_kernels_enabled

        if scale is None and (triton_kernels_enabled(w) or compiled_cpu_enabled(w)):
            self._check_weight(w)
            gs = self.global_scale(w) if global_scale is None else global_scale.float().reshape(1)
            if compiled_cpu_enabled(w):
                from ..kernels.nvfp4_compiled import nvfp4_fake_quant_compiled

                return nvfp4_fake_quant_compiled(w.detach(), gs)
            from ..kernels.nvfp4_triton import nvfp4_quantize_triton

            return nvfp4_quantize_triton(w.detach(), gs.to(w.device), want_dequant=True)[2]
        self._check_weight(w)
        w = w.detach()
        gs = self.global_scale(w) if global_scale is None else global_scale.float().reshape(1).to(w.device)
        scale = self.group_scales(w, gs) if scale is None else scale
        eff = (scale.float() / gs).unsqueeze(-1)
        return (e2m1_round(_groups(w) / eff) * eff).flatten(-2)

    def compact_weight(self, w: torch.Tensor) -> CompactWeight:
        """Packed codes (half a byte per weight) and FP8 group scales, as :meth:`pack` writes them."""
        t = self.pack(w)
        return CompactWeight(
            codes=t["weight_packed"], table=_byte_pairs(w.device), scale=t["weight_scale"],
            divisor=t["weight_global_scale"].float(),
        )

    def code_grid(self, tensors: Mapping[str, torch.Tensor]) -> CodeGrid:
        """E2M1 values times each group's ``weight_scale / weight_global_scale``."""
        eff = tensors["weight_scale"].float() / tensors["weight_global_scale"].float().reshape(1, 1)
        return CodeGrid(values=e2m1_decode(unpack_codes(tensors["weight_packed"])), scale=eff, round=e2m1_round)

    def pack_grid(self, tensors: Mapping[str, torch.Tensor], values: torch.Tensor) -> dict[str, torch.Tensor]:
        """New ``weight_packed`` from E2M1 ``values``; ``weight_scale`` and ``weight_global_scale`` kept."""
        if values.shape != tensors["weight_scale"].shape[:-1] + (tensors["weight_scale"].shape[-1] * GROUP_SIZE,):
            raise ValueError(f"NVFP4 pack_grid: values of shape {tuple(values.shape)} do not match the scales "
                             f"{tuple(tensors['weight_scale'].shape)} x {GROUP_SIZE}")
        return {**tensors, "weight_packed": pack_codes(e2m1_codes(values))}  # nearest E2M1 code, ties as e2m1_round

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
        """RTN, GPTQ at each damping and the scale sweep (:func:`pq_lightning.gptq.refine_nvfp4`)."""
        from ..gptq import refine_nvfp4

        gs = self.global_scale(w) if global_scale is None else global_scale
        return refine_nvfp4(w, H_fit, H_heldout, global_scale=gs, config=config, factor_cache=factor_cache,
                            H_refit=H_refit, input_error=input_error)

    # ---- activations ---------------------------------------------------------------------
    def calibrate_input_global_scale(self, amax: torch.Tensor | float) -> torch.Tensor | None:
        if not self.quantizes_activations:
            return None
        return global_scale_from_amax(amax)

    def fake_quant_activation(
        self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dynamic per-16 FP8 scales under a static global scale, as the W4A4 kernel does.

        Without ``input_global_scale`` the global scale comes from this ``x``'s own amax (the
        calibration rule applied to one batch). Returns ``x``'s dtype, as compressed-tensors does.
        """
        if not self.quantizes_activations:
            return x
        if x.shape[-1] % GROUP_SIZE:
            raise ValueError(f"NVFP4 activations need a last dimension divisible by 16, got {x.shape[-1]}")
        g = _groups(x)
        amax = g.abs().amax(-1)
        if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf: 16x less to check than x
            check_finite(x, "NVFP4 activation")
        gs = (
            global_scale_from_amax(amax.amax()).to(x.device)
            if input_global_scale is None
            else input_global_scale.float().reshape(1).to(x.device)
        )
        eff = fp8_group_scales(amax, gs).float() / gs
        eff = eff.unsqueeze(-1)
        return (e2m1_round(g / eff) * eff).flatten(-2).to(x.dtype)

    # ---- config --------------------------------------------------------------------------
    def scheme(self, targets: list[str]):
        from compressed_tensors.quantization import preset_name_to_scheme

        return preset_name_to_scheme("NVFP4" if self.quantizes_activations else "NVFP4A16", targets)


class NVFP4A16(NVFP4):
    """Weight-only NVFP4 (activations stay BF16): compressed-tensors ``NVFP4A16``."""

    name = "nvfp4a16"
    quantizes_activations = False
    smooth_inputs = False
    static_input_scale = False
