"""FP8 E4M3 weights under one per-tensor scale, activations FP8 per token at run time.

A worked example of a format added from outside the core: it is not registered by default, and
``register_format(FP8PerTensor())`` makes it work in the probe, the cost model, the refiner, the
export, the served model and the evaluation without any other change. What it declares:

* weight scale ``s = bf16(amax(W) / 448)`` (computed in fp32, rounded to the nearest BF16 value,
  a zero scale replaced by fp32's eps), stored as ``weight_scale`` fp32 ``[1]``; weight
  ``fp8(W / s)`` stored as ``weight``. BF16-exact for the same reason as :mod:`.fp8`'s row scales:
  transformers keeps scales in the model dtype, vLLM in fp32, and both then decode the same weight;
* ``shares_global_scale``: vLLM runs fused siblings (q/k/v, gate/up) as one matmul under the largest
  sibling scale and requantizes every sibling's FP8 weight to it at load time; packed under that
  shared scale, the siblings are already on the grid they are served on, instead of being rounded a
  second time onto a coarser one;
* activations: dynamic per token, ``amax(x_t) / 448`` (as FP8 W8A8): nothing to calibrate, so no
  ``static_input_scale``; no activation smoothing; no ``refine`` (the refiner keeps RTN);
* compressed-tensors scheme: the weights of its ``FP8`` preset (strategy ``tensor``) with the
  dynamic per-token input activations of ``FP8_DYNAMIC``; on disk ``float-quantized``.

Bits per Linear: 8 per weight plus one fp32 scale, 32 bits fewer per output row than per-channel FP8.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .base import QuantFormat, Shape
from .compact import CompactWeight
from .fp8 import fake_quant_per_token, fp8_byte_values, fp8_round, weight_scale_from_amax


class FP8PerTensor(QuantFormat):
    """W8A8 FP8: one static weight scale per tensor, dynamic per-token activations."""

    name = "fp8_tensor"
    quantizes_activations = True
    tensor_names = ("weight", "weight_scale")
    shares_global_scale = True
    global_scale_tensor = "weight_scale"

    def bits(self, shape: Shape) -> int:
        return int(shape[0]) * int(shape[1]) * 8 + 32

    def weight_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale of ``w`` alone, fp32 ``[1]`` (siblings use :meth:`shared_global_scale`)."""
        return weight_scale_from_amax(w.detach().abs().amax().float().reshape(1))

    def shared_global_scale(self, weights: Iterable[torch.Tensor]) -> torch.Tensor:
        """The largest of the siblings' scales (rounding to BF16 keeps the order: the scale of the max amax)."""
        amax = torch.stack([w.detach().abs().amax().float() for w in weights])
        return weight_scale_from_amax(amax.amax().reshape(1))

    def pack(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check_weight(w)
        w = w.detach()
        s = self.weight_scale(w) if global_scale is None else global_scale.float().reshape(1).to(w.device)
        return {"weight": fp8_round(w.float() / s), "weight_scale": s}

    def unpack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = tensors["weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{self.name} weights must be float8_e4m3fn on disk, got {w.dtype}")
        return w.float() * tensors["weight_scale"].float().reshape(1)

    def compact_weight(self, w: torch.Tensor) -> CompactWeight:
        """The FP8 codes (a byte per weight) and the one scale, as :meth:`pack` writes them."""
        t = self.pack(w)
        return CompactWeight(
            codes=t["weight"].view(torch.uint8), table=fp8_byte_values(w.device),
            scale=t["weight_scale"].float().reshape(1, 1),
        )

    def fake_quant_activation(
        self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token dynamic FP8, as the W8A8 kernel does (``input_global_scale`` is not used)."""
        return fake_quant_per_token(x)

    def scheme(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

        weights = preset_name_to_scheme("FP8", targets).weights
        activations = preset_name_to_scheme("FP8_DYNAMIC", targets).input_activations
        return QuantizationScheme(targets=targets, weights=weights, input_activations=activations)
