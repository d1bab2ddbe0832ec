"""Lightning callbacks of pq-lightning (importable as ``pq_lightning.callbacks``)."""

from .fisher_probe import FisherProbe
from .smoothing_statistics import SmoothingStatistics

__all__ = ["FisherProbe", "SmoothingStatistics"]
