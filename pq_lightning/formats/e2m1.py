"""FP4 E2M1 codes: rounding, nibble packing and decoding (torch reference implementation).

A code is 4 bits: ``sign << 3 | index``, with ``index`` into :data:`E2M1_VALUES`. Two codes go in
one byte, the even column in the low nibble, exactly as compressed-tensors' ``pack_fp4_to_uint8``
and vLLM's kernels expect.

Rounding is to the nearest value with ties to the even mantissa (0.25→0, 0.75→1, 1.25→1,
1.75→2, 2.5→2, 3.5→4, 5→4), matching compressed-tensors' ``cast_to_fp4``. The sign bit follows
the sign of the scaled input, so a small negative value rounds to ``-0`` (code 8), as the
reference's ``sign(x) * 0`` does.
"""

from __future__ import annotations

import torch

#: Magnitudes of the eight E2M1 codes (index 0..7).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0

_E2M1_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def _signed_table(device: torch.device) -> torch.Tensor:
    table = _E2M1_TABLE_CACHE.get(device)
    if table is None:
        mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        table = torch.cat([mags, -mags]).to(device)
        _E2M1_TABLE_CACHE[device] = table
    return table


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Round ``scaled`` (already divided by its scale, any float dtype) to E2M1 codes (uint8)."""
    a = scaled.abs()
    idx = (a > 0.25).to(torch.uint8)
    idx += a >= 0.75
    idx += a > 1.25
    idx += a >= 1.75
    idx += a > 2.5
    idx += a >= 3.5
    idx += a > 5.0
    sign = torch.signbit(scaled).to(torch.uint8) << 3
    return idx | sign


def e2m1_round(scaled: torch.Tensor) -> torch.Tensor:
    """Round ``scaled`` to the nearest signed E2M1 value (fp32), equal to decoding its codes.

    E2M1 is a grid of step 0.5 below 2, 1 below 4 and 2 up to 6; ``torch.round`` rounds half to
    even on ``a / step`` (a power-of-two division, exact), which is the ties-to-even rule.
    """
    scaled = scaled.float()
    a = scaled.abs()
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    r = torch.clamp_max(torch.round(a / step) * step, E2M1_MAX)
    return torch.copysign(r, scaled)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint8 E2M1 codes (low 4 bits used) to fp32 values, signed zero included."""
    return _signed_table(codes.device)[(codes & 0x0F).long()]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``[out, in]`` uint8 codes into ``[out, in // 2]`` bytes, even column low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {codes.shape[-1]}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[out, in // 2]`` bytes to ``[out, in]`` uint8 codes."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed FP4 weights must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
