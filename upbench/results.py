"""The results store: one JSON row per finished run (schema: :mod:`upbench.schema`), written atomically, so a killed
run never leaves a half-written row and concurrent writers never clobber each other; and the rows as one tidy
pandas DataFrame for users and reports::

    import upbench.results as r
    df = r.load("results")          # one line per run: method, backbone, dataset, task, metric columns, ...
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from . import schema
from .errors import UpbenchError
from .files import atomic_write


def _reject_constant(name: str) -> Any:
    """Rows are strict JSON: NaN / Infinity in a file means it is not a row of ours."""
    raise ValueError(f"{name} is not strict JSON")

#: config keys that do not change what a run computes
HASH_EXCLUDE = ("paths", "force", "hydra", "threads", "loader")


def config_hash(config: Mapping[str, Any], exclude: Iterable[str] = HASH_EXCLUDE) -> str:
    clean = {k: v for k, v in config.items() if k not in set(exclude)}
    blob = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _direct_url() -> Dict[str, Any]:
    """The installer's record of where upbench came from (PEP 610), if any."""
    try:
        text = metadata.distribution("upbench").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return {}
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def _own_checkout() -> Optional[Path]:
    """The upbench source tree this package runs from, when it is one: a git work tree whose top level holds
    upbench's own pyproject.toml (never the repository a wheel happens to be installed inside)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    top = Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
    if top is None or top != here.parent:
        return None
    try:
        project = (top / "pyproject.toml").read_text()
    except OSError:
        return None
    return top if 'name = "upbench"' in project else None


def git_sha() -> Optional[str]:
    """The commit upbench itself was built from: its own checkout's HEAD (editable or source runs, ``+dirty`` when
    it has uncommitted changes), or the commit a VCS install recorded; None for a plain wheel."""
    top = _own_checkout()
    if top is not None:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=top, capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=top,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return (sha + ("+dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = (_direct_url().get("vcs_info") or {}).get("commit_id")
    return commit[:7] if commit else None


def upbench_version() -> str:
    import upbench

    try:
        return metadata.version("upbench")
    except metadata.PackageNotFoundError:
        return upbench.__version__


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def versions() -> Dict[str, Optional[str]]:
    import torch

    info: Dict[str, Optional[str]] = {"upbench": upbench_version(), "torch": torch.__version__,
                                      "python": platform.python_version(), "git_sha": git_sha()}
    for pkg in ("timm", "torchvision", "torchmetrics"):
        info[pkg] = _package_version(pkg)
    return info


def _package_version(pkg: str) -> Optional[str]:
    """The version of ``pkg`` as loaded, or as installed when the job never imported it: importing a package only
    to read its version costs seconds (torchmetrics alone ~8 s on a laptop CPU) in every job."""
    loaded = sys.modules.get(pkg)
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    try:
        return metadata.version(pkg)
    except Exception:  # noqa: BLE001  (a broken install must not lose a finished result)
        return None


def device_info(device: Any) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"type": device.type, "threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine(), "host": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")   # how CPU threads wait (a timing setting)
    compat = sys.modules.get("upbench.compat")
    info["torchvision_fallback"] = bool(getattr(compat, "FALLBACK_ACTIVE", False))
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def train_weights_path(cfg: Mapping[str, Any]) -> Path:
    """``<train.out_dir>/<upsampler>_<backbone>.safetensors``: where a finished training leaves its weights."""
    out_dir = Path(os.path.expanduser(str(cfg["train"]["out_dir"])))
    return out_dir / f"{cfg['upsampler']['name']}_{cfg['backbone']['name']}.safetensors"


def _write_json(dst: Path, obj: Dict[str, Any]) -> None:
    with atomic_write(dst) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, default=str, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())


class ResultStore:
    """``<root>/rows/<config_hash>.json``: one tidy row per finished run."""

    def __init__(self, root: str):
        self.root = Path(os.path.expanduser(str(root))).resolve()
        self.rows_dir = self.root / "rows"

    def path(self, key: str) -> Path:
        return self.rows_dir / f"{key}.json"

    def checkpoint_path(self, key: str) -> Path:
        """Where an unfinished run of this config keeps its resumable state."""
        return self.root / "checkpoints" / f"{key}.pt"

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def read(self, key: str) -> Dict[str, Any]:
        return self.read_file(self.path(key))

    def write(self, row: Dict[str, Any]) -> Path:
        """Store a finished row (strict JSON, atomically); a failure record of the same config is then obsolete."""
        dst = self.path(row["config_hash"])
        _write_json(dst, row)
        self.failure_path(row["config_hash"]).unlink(missing_ok=True)
        return dst

    def failure_path(self, key: str) -> Path:
        """``<root>/failed/<config_hash>.json``: why the last run of this config ended without a result."""
        return self.root / "failed" / f"{key}.json"

    def write_failure(self, record: Dict[str, Any]) -> Path:
        dst = self.failure_path(record["config_hash"])
        _write_json(dst, record)
        return dst

    def set_aside(self, key: str) -> Optional[Path]:
        """Move an unreadable row out of the way (kept as ``<hash>.json.unreadable``) so the run can redo it."""
        src = self.path(key)
        if not src.exists():
            return None
        dst = src.with_name(src.name + ".unreadable")
        os.replace(src, dst)
        return dst

    def read_file(self, path: Path) -> Dict[str, Any]:
        """One row file, upgraded to this schema; :class:`UpbenchError` naming the file when it is not a row of ours
        (not strict JSON, not an object, a newer schema)."""
        try:
            row = json.loads(path.read_text(), parse_constant=_reject_constant)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise UpbenchError(f"{path}: not a readable result row ({type(exc).__name__})") from None
        if not isinstance(row, dict) or "task" not in row or "status" not in row:
            raise UpbenchError(f"{path}: not a result row")
        try:
            version = int(row.get("schema", 1))
        except (TypeError, ValueError):
            raise UpbenchError(f"{path}: not a result row (schema {row.get('schema')!r})") from None
        if version > schema.SCHEMA_VERSION:
            raise UpbenchError(f"{path}: written by a newer upbench (row schema {version} > {schema.SCHEMA_VERSION});"
                               " upgrade upbench to read it")
        return schema.upgrade(row)

    def rows(self, warn: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
        """Every readable row, upgraded to this schema.  A file that is not a row of ours (bad JSON, not an object, a
        newer schema) is skipped with one warning naming it (``warn``; default :func:`warnings.warn`): one bad file
        never hides the rest."""
        if not self.rows_dir.is_dir():
            return []
        out = []
        for p in sorted(self.rows_dir.glob("*.json")):
            try:
                out.append(self.read_file(p))
            except UpbenchError as exc:
                msg = f"skipping {exc}"
                warn(msg) if warn else warnings.warn(msg, stacklevel=2)
        return out


# ---------------------------------------------------------------------------------------------------- protocols
#: top-level config keys that never change what a run measures (the seed is averaged over, not split on)
NOT_PROTOCOL = {"seed", "paths", "force", "hydra", "threads", "device", "cluster", "upsampler", "dataset"}
#: dataset settings every dataset shares and a table must not mix (a 448 px and a 224 px run are different tables)
TABLE_DATASET_KEYS = ("img_size", "limit_train", "limit_val", "reference_size")


def flat(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists as JSON text)."""
    if isinstance(obj, Mapping):
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix: json.dumps(obj, default=str)}
    return {prefix: obj}


def protocol(cfg: Mapping[str, Any], device: Optional[str] = None) -> Dict[str, Any]:
    """Everything in a run's config that changes its numbers except the upsampler, the dataset itself and the seed,
    flattened: the task (minus caches), the backbone, the top-level switches, the settings every dataset shares,
    and the device type the run was timed on.  Runs with equal protocols may share a table."""
    task = cfg.get("task")
    task = {k: v for k, v in task.items() if k != "cache"} if isinstance(task, Mapping) else {"name": task}
    dataset = cfg.get("dataset") if isinstance(cfg.get("dataset"), Mapping) else {}
    out = flat({"task": task, "backbone": cfg.get("backbone") or {},
                "dataset": {k: dataset.get(k) for k in TABLE_DATASET_KEYS},
                **{k: v for k, v in cfg.items() if k not in NOT_PROTOCOL and k not in ("task", "backbone")}})
    out["device"] = device
    return out


def protocol_id(cfg: Mapping[str, Any], device: Optional[str] = None) -> str:
    """A short name for a run's protocol: the preset's name when it ran under one, else a hash of :func:`protocol`."""
    preset = cfg.get("protocol")
    if isinstance(preset, Mapping) and preset.get("name"):
        return str(preset["name"])
    return "p-" + config_hash(protocol(cfg, device), exclude=())[:8]


# ---------------------------------------------------------------------------------------------------- DataFrame
def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def _scalars(section: Any, prefix: str) -> Dict[str, Any]:
    if not isinstance(section, Mapping):
        return {}
    return {f"{prefix}{k}": v for k, v in section.items() if v is None or isinstance(v, (int, float, str, bool))}


def flatten(row: Mapping[str, Any]) -> Dict[str, Any]:
    """One flat record: identity columns (``protocol``: see :func:`protocol_id`), ``metric.*``, ``timing.*``,
    ``memory.*``, ``data.*`` (scalars only),
    parameters, weights, config hash, versions, device -- and the full ``config`` (a dict) for grouping."""
    cfg = row.get("config") or {}
    rec: Dict[str, Any] = {
        "method": row.get("upsampler"), "backbone": row.get("backbone"), "dataset": row.get("dataset"),
        "task": row.get("task"), "protocol": protocol_id(cfg, _get(row, "device.type")),
        "status": row.get("status"), "seed": row.get("seed"),
        "params": (row.get("params") or {}).get("upsampler"),
        "weights": _get(cfg, "upsampler.weights"),
        "config_hash": row.get("config_hash"), "note": row.get("note"), "error": row.get("error"),
        "upbench_version": _get(row, "versions.upbench"), "git_sha": _get(row, "versions.git_sha"),
        "torch_version": _get(row, "versions.torch"), "device": _get(row, "device.type"),
        "finished": row.get("finished"),
    }
    rec.update(_scalars(row.get("metrics"), "metric."))
    rec.update(_scalars(row.get("timing"), "timing."))
    rec.update(_scalars(row.get("memory"), "memory."))
    rec.update(_scalars(row.get("data"), "data."))
    rec["config"] = cfg
    return rec


def frame(rows: Iterable[Mapping[str, Any]]):
    """Rows as a pandas DataFrame, one line per run (see :func:`flatten` for the columns)."""
    import pandas as pd

    return pd.DataFrame([flatten(r) for r in rows])


def load(directory: str = "results"):
    """``upbench.results.load("results")``: every row of a results folder as a pandas DataFrame."""
    return frame(ResultStore(directory).rows())
