"""Lightning callbacks of pq-lightning (importable as ``pq_lightning.callbacks``)."""

from .fisher_probe import FisherProbe

__all__ = ["FisherProbe"]
