"""Lightning callbacks of pq-lightning (importable as ``pq_lightning.callbacks``)."""

from .first_batch_flops import FirstBatchFlops
from .fisher_probe import FisherProbe
from .heap_trim import HeapTrim
from .smoothing_statistics import SmoothingStatistics

__all__ = ["FirstBatchFlops", "FisherProbe", "HeapTrim", "SmoothingStatistics"]
