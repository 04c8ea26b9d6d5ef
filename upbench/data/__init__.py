"""Datasets in their standard layouts (no mmsegmentation needed) plus the embedded ``demo`` and ``demo_depth`` sets."""
from . import ade20k, cityscapes, cocostuff, demo, depth, images, prompts, voc  # noqa: F401  (registration)
from .base import DATASETS, IGNORE, SegDataset

__all__ = ["DATASETS", "IGNORE", "SegDataset"]
