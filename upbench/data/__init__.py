"""Datasets (plugins of :data:`upbench.registry.DATASETS`) in their standard layouts (no mmsegmentation needed), the
embedded offline sets (``demo``, ``demo_depth``, ``demo_images``, ``demo_prompts``) and training image folders.
The registry imports every module here on first use."""
from upbench import compat  # noqa: F401  (torchvision fallback before the transforms import torchvision)
from upbench.registry import DATASETS

from .base import IGNORE, SegDataset

__all__ = ["DATASETS", "IGNORE", "SegDataset"]
