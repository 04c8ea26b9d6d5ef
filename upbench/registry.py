"""A small name -> factory registry shared by upsamplers, tasks, backbones and datasets."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional

from .errors import UnknownNameError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

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

    def get(self, name: str) -> Any:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; registered {self.kind}s: {', '.join(self.available())}"
            ) from None

    def create(self, key: str, /, **kwargs: Any) -> Any:
        return self.get(key)(**kwargs)

    def available(self) -> List[str]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self._entries)
