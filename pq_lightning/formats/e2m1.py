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


class E2M1Table:
    """E2M1 rounding by table lookup, bit for bit :func:`e2m1_codes` in fewer tensor ops.

    With ``t = 8|x|`` (exact: a power-of-two scaling), the key ``⌊t⌋ + ⌈t⌉`` is ``2k + 1`` inside
    ``(k/8, (k+1)/8)`` and ``2k`` at ``|x| = k/8``. Every rounding boundary (0.25, 0.75, … 5) is a
    multiple of 1/8, so the key tells on which side of each boundary ``|x|`` lies, ties included, and
    tables give the code's magnitude index and value. Keys above ``2·48`` (``|x| > 6``, ``inf``
    included) are clamped: they all round to the largest magnitude. The sign is the sign of ``x``
    (``-0`` included). One table per device (:meth:`on`).
    """

    KEY_MAX = 97
    #: (boundary, whether |x| == boundary rounds up): e2m1_codes' comparisons
    _BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
    _CACHE: dict[torch.device, E2M1Table] = {}

    def __init__(self, device: torch.device) -> None:
        keys = [key / 16 for key in range(self.KEY_MAX + 1)]  # a representative |x| per key
        idx = torch.tensor([sum((a > b) or (a == b and up) for b, up in self._BOUNDS) for a in keys])
        self.index = idx.to(device=device, dtype=torch.uint8)
        # one more entry, for NaN keys (e2m1_round maps NaN to NaN, as the arithmetic rule does)
        nan = torch.tensor([float("nan")])
        self.magnitude = torch.cat([e2m1_decode(idx.to(torch.uint8)), nan]).to(device)

    @classmethod
    def on(cls, device: torch.device) -> E2M1Table:
        table = cls._CACHE.get(device)
        if table is None:
            table = cls._CACHE[device] = cls(device)
        return table

    def key(self, t: torch.Tensor) -> torch.Tensor:
        """The key of ``t = 8x`` (fp32), as fp32 in ``[0, KEY_MAX]``; ``t`` must hold no NaN."""
        a = t.abs()
        return torch.floor(a).add_(a.ceil_()).clamp_max_(self.KEY_MAX)

    def codes(self, key: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """uint8 codes from integer-valued keys (any dtype) and the sign bits of ``x``."""
        return self.index[key.long()] | (negative.to(torch.uint8) << 3)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (fp32) rounded to the nearest signed E2M1 value; NaN stays NaN."""
        key = self.key(x * 8.0).nan_to_num_(nan=self.KEY_MAX + 1)
        return torch.copysign(self.magnitude[key.long()], x)


def e2m1_round(scaled: torch.Tensor) -> torch.Tensor:
    """Round ``scaled`` to the nearest signed E2M1 value (fp32), equal to decoding its codes.

    Ties go to the even mantissa; ``-0`` for small negatives; NaN stays NaN (:class:`E2M1Table`).
    """
    scaled = scaled.float()
    return E2M1Table.on(scaled.device).round(scaled)


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
