"""Metrics computed from confusion counts, so they add up across batches and workers."""

from histokd.metrics.segmentation import BinaryConfusion, binary_confusion

__all__ = ["BinaryConfusion", "binary_confusion"]
