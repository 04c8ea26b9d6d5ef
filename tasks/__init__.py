"""Tasks (installed as ``upbench.tasks``): a task takes a :class:`upbench.protocols.Job` -- the core's data path
(:class:`upbench.pipeline.Pipeline`: backbone features, cached, and the upsampler call, timed), the built datasets
and its config section -- and returns the metrics part of a result row; it never parses names or builds models.
One module per task, registered with ``@register("name")`` on a :class:`upbench.protocols.Task` subclass that
declares its report table (:class:`upbench.protocols.TableSpec`)."""
from __future__ import annotations

from upbench import compat  # noqa: F401  (torchvision fallback before any task imports torchvision / diffusers)
from upbench.registry import TASKS


def register(name: str):
    """``@register("seg")`` on a Task class: registers one instance of it."""
    def wrap(cls):
        TASKS.register(name)(cls())
        cls.registry_name = name
        return cls

    return wrap


def get(name: str):
    return TASKS.get(name)


def available():
    return TASKS.available()
