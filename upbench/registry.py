"""Registries: name -> plugin, one per kind of plugin, found by lazy discovery.

The core never imports a plugin module by name.  It asks a registry, and the registry imports its plugin package
(and every public module in it, which register themselves with a decorator) the first time a name is looked up --
the pattern of lm-evaluation-harness's ``api/registry.py`` and timm's ``register_model``::

    from upbench.registry import UPSAMPLERS

    @UPSAMPLERS.register("bilinear")
    class Bilinear(Upsampler): ...

    UPSAMPLERS.create("bilinear")        # imports upbench.upsamplers.* on first use
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Dict, Iterator, List, Optional

from .errors import UnknownNameError


class Registry:
    """``kind``: what the entries are (for messages); ``package``: the plugin package (or module) imported, with
    all its public submodules, before the first look-up."""

    def __init__(self, kind: str, package: Optional[str] = None):
        self.kind = kind
        self.package = package
        self._entries: Dict[str, Any] = {}
        self._discovered = package is None

    def register(self, name: Optional[str] = None, *, override: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register("name")`` stores a class or function under ``name``."""

        def wrap(obj: Any) -> Any:
            key = name or getattr(obj, "__name__").lower()
            if key in self._entries and self._entries[key] is not obj and not override:
                raise ValueError(f"{self.kind} '{key}' is already registered by {self._entries[key]!r}")
            self._entries[key] = obj
            try:
                obj.registry_name = key
            except (AttributeError, TypeError):
                pass
            return obj

        return wrap

    def discover(self) -> None:
        """Import the plugin package and its public modules once (modules named ``_*`` are private helpers)."""
        if self._discovered:
            return
        self._discovered = True   # first: a plugin module may itself look names up while it is imported
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> Any:
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; registered {self.kind}s: {', '.join(self.available())}"
            ) from None

    def create(self, key: str, /, **kwargs: Any) -> Any:
        return self.get(key)(**kwargs)

    def available(self) -> List[str]:
        self.discover()
        return sorted(self._entries)

    def items(self):
        self.discover()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)


#: the plugin kinds; each plugin module registers itself in one of these
UPSAMPLERS = Registry("upsampler", "upbench.upsamplers")
TASKS = Registry("task", "upbench.tasks")
BACKBONES = Registry("backbone", "upbench.backbones")
DATASETS = Registry("dataset", "upbench.data")
