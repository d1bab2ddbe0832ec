"""A quantized weight as values on its format's grid times scales that stay fixed.

Tuning moves a Linear's codes while its scales stay as refine chose them: the served weight is
``value[o, i] · scale[o, g]``, ``g`` the group of column ``i``, and each ``value`` may move to any
other point of the format's grid (:attr:`CodeGrid.round`). What is written afterwards is the same
format with the same scale tensors and new codes (:meth:`QuantFormat.pack_grid
<pq_lightning.formats.base.QuantFormat.pack_grid>`), so the server sees nothing new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def grid_weight(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values [out, in]`` times ``scale [out, groups]``, each scale over ``in / groups`` consecutive columns."""
    rows, groups = scale.shape
    return (values.view(rows, groups, -1) * scale.unsqueeze(-1)).view(rows, -1)


@dataclass
class CodeGrid:
    """``weight = values · scale`` per group of ``in / groups`` consecutive columns.

    * ``values``: fp32 ``[out, in]``, each a point of the format's grid (in units of its scale);
    * ``scale``: fp32 ``[out, groups]``, the effective scale of each group (fixed);
    * ``round``: the nearest grid point of each element (fp32 in, fp32 out, same shape).
    """

    values: torch.Tensor
    scale: torch.Tensor
    round: Callable[[torch.Tensor], torch.Tensor]

    def weight(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The served weight ``[out, in]`` (fp32) of ``values`` (default: :attr:`values`)."""
        return grid_weight((self.values if values is None else values).float(), self.scale.float())
