"""Append-only results store: one JSON file per finished run, written atomically (temp file + rename), so a
killed run never leaves a half-written row and concurrent writers never clobber each other."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from .files import atomic_write

#: config keys that do not change what a run computes
HASH_EXCLUDE = ("paths", "force", "hydra", "threads")


def config_hash(config: Mapping[str, Any], exclude: Iterable[str] = HASH_EXCLUDE) -> str:
    clean = {k: v for k, v in config.items() if k not in set(exclude)}
    blob = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_sha() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, Optional[str]]:
    import upbench

    info: Dict[str, Optional[str]] = {"upbench": upbench.__version__, "torch": torch.__version__,
                                      "python": platform.python_version(), "git_sha": git_sha()}
    for pkg in ("timm", "torchvision", "torchmetrics"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # a broken optional import must not lose a finished result
            info[pkg] = None
    return info


def device_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"type": device.type, "threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine(), "host": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    from upbench import compat

    info["torchvision_fallback"] = compat.FALLBACK_ACTIVE
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
        return json.loads(self.path(key).read_text())

    def write(self, row: Dict[str, Any]) -> Path:
        dst = self.path(row["config_hash"])
        with atomic_write(dst) as tmp, open(tmp, "w") as fh:
            json.dump(row, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        return dst

    def rows(self) -> List[Dict[str, Any]]:
        if not self.rows_dir.is_dir():
            return []
        out = []
        for p in sorted(self.rows_dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (json.JSONDecodeError, OSError):
                continue  # not ours / unreadable: never let one bad file hide the rest
        return out
