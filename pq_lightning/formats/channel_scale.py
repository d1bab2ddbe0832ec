"""A quantized weight whose output rows carry a scale the server reads as any value.

FP8 per-channel stores one scale per output row (``weight_scale [out, 1]``), and the served weight
is ``code[o, i] · scale[o]``: multiplying a row's scale by a gain multiplies that row of the served
weight by it, codes untouched, the checkpoint still the same format. Norm tuning uses this as a free
per-output-channel gain (:class:`pq_lightning.norm_tune.ChannelGain`). NVFP4 has no such scale: its
group scales are FP8 numbers and its global scale is shared by fused siblings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ChannelScale:
    """``weight[o, :] = codes[o, :] · scale[o]``.

    * ``scale``: fp32 ``[out]``, each row's scale as packed;
    * ``round``: the nearest scale the checkpoint can carry exactly (fp32 in, fp32 out, same shape).
    """

    scale: torch.Tensor
    round: Callable[[torch.Tensor], torch.Tensor]
