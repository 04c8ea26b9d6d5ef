"""Upsamplers (installed as ``upbench.upsamplers``).  Adding a method = one module here with ``@register("name")``
and one YAML in ``configs/upsampler/``; the registry (:data:`upbench.registry.UPSAMPLERS`) imports every module of
this package on first use, so nothing else changes::

    from upbench import upsamplers
    model = upsamplers.create("jafar", in_channels=384, patch_size=14, weights="vit_small_patch14_dinov2.lvd142m")
    hr = model(image, features, output_size=(448, 448))
"""
from __future__ import annotations

from typing import Any, List, Optional, Type

from upbench import compat  # noqa: F401  (torchvision fallback before any method imports timm / torchvision)
from upbench.errors import UpbenchError
from upbench.registry import UPSAMPLERS

register = UPSAMPLERS.register


def available() -> List[str]:
    return UPSAMPLERS.available()


def get(name: str) -> Type[Any]:
    return UPSAMPLERS.get(name)


def create(name: str, weights: Optional[str] = None, **kwargs: Any):
    """Build upsampler ``name`` (kwargs go to its constructor); ``weights`` = official name or local path."""
    model = get(name)(**kwargs)
    if weights:
        model.load_official(str(weights))
    return model


def for_official_method(method: str) -> Type[Any]:
    """The class that reproduces an official implementation named ``method`` (golden files' ``method`` field)."""
    for _, cls in UPSAMPLERS.items():
        if method in getattr(cls, "official_methods", ()):
            return cls
    raise UpbenchError(f"no registered upsampler reproduces the official method '{method}'")


from .base import Upsampler  # noqa: E402

__all__ = ["Upsampler", "UPSAMPLERS", "register", "available", "get", "create", "for_official_method"]
