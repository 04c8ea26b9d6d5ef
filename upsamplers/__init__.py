"""Upsampler registry.  Adding a method = one module here with ``@register("name")`` + one YAML in
``configs/upsampler/``; every module in this package is imported on first use, so nothing else changes."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, List, Optional, Type

import upbench  # noqa: F401  (installs the torchvision fallback before any method imports timm/torchvision)
from upbench.errors import UpbenchError
from upbench.registry import Registry

UPSAMPLERS = Registry("upsampler")
register = UPSAMPLERS.register
_loaded = False
_SKIP = {"base", "layers"}


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SKIP and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> List[str]:
    _load_all()
    return UPSAMPLERS.available()


def get(name: str) -> Type[Any]:
    _load_all()
    return UPSAMPLERS.get(name)


def create(name: str, weights: Optional[str] = None, **kwargs: Any):
    """Build upsampler ``name`` (kwargs go to its constructor); ``weights`` = official name or local path."""
    model = get(name)(**kwargs)
    if weights:
        model.load_official(str(weights))
    return model


def for_official_method(method: str) -> Type[Any]:
    """The class that reproduces an official implementation named ``method`` (golden files' ``method`` field)."""
    _load_all()
    for _, cls in UPSAMPLERS.items():
        if method in getattr(cls, "official_methods", ()):
            return cls
    raise UpbenchError(f"no registered upsampler reproduces the official method '{method}'")


from .base import Upsampler  # noqa: E402

__all__ = ["Upsampler", "UPSAMPLERS", "register", "available", "get", "create", "for_official_method"]
