"""A quantized weight kept as its byte codes and decoded by table lookup.

A cache that holds ``Q(W)`` of every Linear for many steps (the Fisher probe's output-space error)
would need 4 bytes per weight in fp32; most formats store one or two values per byte. Such a
format describes its packed tensors as a :class:`CompactWeight` (:meth:`QuantFormat.compact_weight
<pq_lightning.formats.base.QuantFormat.compact_weight>`): byte codes, a 256-entry table of the
values each byte holds, and the scales that multiply them. Decoding is one gather and one multiply,
the same fp32 arithmetic as the format's ``unpack``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompactWeight:
    """``value[o, i] = table[codes[o, b]][k] · scale[o, g] / divisor`` for the ``k``-th value of byte ``b``.

    * ``codes``: uint8 ``[out, n_bytes]``;
    * ``table``: fp32 ``[256, values_per_byte]``, the values each byte holds, in column order
      (1 per byte for FP8; 2 for packed E2M1, even column first);
    * ``scale``: ``[out, groups]`` (or ``[1, groups]`` for one scale over all rows), any float dtype,
      each scale covering ``in / groups`` consecutive columns (``groups = 1``: one scale per row);
    * ``divisor``: fp32 ``[1]`` dividing every scale (NVFP4's global scale), or ``None``.
    """

    codes: torch.Tensor
    table: torch.Tensor
    scale: torch.Tensor
    divisor: torch.Tensor | None = None

    def decode(self) -> torch.Tensor:
        """The dequantised weight ``[out, in]`` in fp32."""
        rows = self.codes.shape[0]
        values = self.table.index_select(0, self.codes.reshape(-1).long())
        eff = self.scale.float() if self.divisor is None else self.scale.float() / self.divisor
        return (values.view(rows, eff.shape[-1], -1) * eff.unsqueeze(-1)).view(rows, -1)

    def nbytes(self) -> int:
        """Bytes held per weight tensor (codes and scales; the shared table is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))
