"""The result-row schema: one row per run, one schema for every task, the sweep and the demo's "not run" entries.

A row is stored as ``<results>/rows/<config_hash>.json`` (strict JSON: no NaN / Infinity).  Every key:

``schema``       int, the version of this schema (rows from a newer upbench are skipped with a warning)
``config_hash``  str, hash of the config minus keys that do not change what is computed (paths, force, threads)
``task``         str, the task (``seg``, ``depth``, ..., ``scaling``)
``upsampler``    str, registry name of the upsampler
``backbone``     str, the backbone's name
``dataset``      str or null, the dataset's name (null for the sweep)
``seed``         int
``status``       ``ok`` | ``failed`` | ``skipped`` (demo: not run) | sweep points: ``time_limit`` | ``oom`` |
                 ``timeout`` | ``error``; only ``ok`` rows carry metrics a report ranks
``metrics``      {name: number or null}: what the task measured (names as the task's table spec declares)
``timing``       {name: number or list}: ``upsampler_ms`` (median per image, device-synchronised), ``backbone_ms``,
                 task-specific times
``memory``       {name: value}: peak memory where measured (sweep points)
``data``         {name: value}: what was measured on (sizes, counts, settings a reader needs to interpret it)
``params``       {"upsampler": int}: parameter count
``artefacts``    {name: path relative to the results folder}: files the run left (e.g. the trained probe's weights)
``note``         str or null: why a row is not a normal result (e.g. a demo entry that was not run)
``error``        str or null: the first line of the error of a failed run / point
``config``       the whole resolved config
``versions``     {package: version}: upbench, torch, timm, ..., git sha
``device``       {type, threads, name, ...}
``started`` / ``finished``  ISO-8601 UTC times; ``wall_s``: seconds the run took
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional

from .errors import RunFailed

SCHEMA_VERSION = 2
STATUSES = ("ok", "failed", "skipped", "time_limit", "oom", "timeout", "error")


@dataclass
class Row:
    config_hash: str
    task: str
    upsampler: str
    backbone: str
    dataset: Optional[str]
    seed: int
    status: str
    metrics: Dict[str, Any] = field(default_factory=dict)
    timing: Dict[str, Any] = field(default_factory=dict)
    memory: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    params: Dict[str, Any] = field(default_factory=lambda: {"upsampler": 0})
    artefacts: Dict[str, str] = field(default_factory=dict)
    note: Optional[str] = None
    error: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, Any] = field(default_factory=dict)
    device: Dict[str, Any] = field(default_factory=dict)
    started: Optional[str] = None
    finished: Optional[str] = None
    wall_s: Optional[float] = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def non_finite(obj: Any, path: str = "") -> Optional[str]:
    """The path of the first NaN / infinite float in ``obj`` (nested dicts and lists), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "value"
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            hit = non_finite(v, f"{path}.{k}" if path else str(k))
            if hit:
                return hit
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = non_finite(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def build_row(cfg: Mapping[str, Any], config_hash: str, status: str, **fields: Any) -> Dict[str, Any]:
    """The one way rows are made: identity fields from the resolved config, the rest from ``fields`` (see the
    module docstring).  A non-finite number in an ``ok`` row is an error, never a stored metric."""
    ident = {"task": _name(cfg.get("task")), "upsampler": _name(cfg.get("upsampler")),
             "backbone": _name(cfg.get("backbone")), "dataset": _name(cfg.get("dataset")),
             "seed": int(cfg.get("seed", 0) or 0)}
    ident.update({k: fields.pop(k) for k in list(ident) if k in fields})
    row = Row(config_hash=config_hash, status=status, config=dict(cfg), **ident, **fields).to_dict()
    if status == "ok":
        bad = non_finite(row["metrics"]) or non_finite(row["timing"])
        if bad:
            raise RunFailed(f"{row['task']} {row['upsampler']}: {bad} is not a finite number; the run did not give "
                            "a usable result (diverged?)")
    return row


def _name(section: Any) -> Optional[str]:
    if isinstance(section, Mapping):
        return section.get("name")
    return section if isinstance(section, str) else None


def upgrade(row: Dict[str, Any]) -> Dict[str, Any]:
    """A row in this schema from one written by an older upbench (before ``schema`` existed, version 1): sweep
    points kept their sizes, family and FLOPs at the top level."""
    version = row.get("schema", 1)
    if version >= SCHEMA_VERSION:
        return row
    out = dict(row)
    if out.get("task") == "scaling":
        data = dict(out.get("data") or {})
        for key in ("size", "grid", "tokens", "pixels", "family", "gflops"):
            if key in out:
                data[key] = out.pop(key)
        out["data"] = data
    for key, default in (("metrics", {}), ("timing", {}), ("memory", {}), ("data", {}), ("params", {"upsampler": 0}),
                         ("artefacts", {})):
        if not isinstance(out.get(key), dict):
            out[key] = default
    out.setdefault("seed", (out.get("config") or {}).get("seed", 0))
    out["schema"] = SCHEMA_VERSION
    return out
