"""Frozen backbones (plugins of :data:`upbench.registry.BACKBONES`, one factory per ``kind`` of backbone config):
``timm_vit`` (DINOv2, DINOv3, CLIP, ... through timm), ``timm_cnn``, ``demo`` (EfficientNet-Lite0, offline) and
``vae`` (TAEF2 / SD1.5 autoencoders for the generative tasks).  The core builds them with
:func:`upbench.pipeline.build_backbone` from a ``backbone`` config."""
from upbench import compat  # noqa: F401  (torchvision fallback before timm imports it)

from .base import Backbone

__all__ = ["Backbone"]
