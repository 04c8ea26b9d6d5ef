"""Task registry: a task takes resolved objects (backbone, upsampler, datasets, config) and returns the
metrics part of a result row; it never parses names.  One module per task, registered with ``@register``."""
from __future__ import annotations

import importlib
import pkgutil

import upbench  # noqa: F401
from upbench.registry import Registry

TASKS = Registry("task")


def register(name: str, *, preflight=None):
    """``@register("seg")`` stores a task function; ``preflight(cfg)``, if given, checks what the task needs (e.g.
    weights) from the full config before the runner builds anything, so a missing piece fails at once."""
    def wrap(fn):
        fn.preflight = preflight
        return TASKS.register(name)(fn)

    return wrap

_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_") and info.name != "common":
                importlib.import_module(f"{__name__}.{info.name}")


def get(name: str):
    _load_all()
    return TASKS.get(name)


def available():
    _load_all()
    return TASKS.available()
