"""What a submitted job is and where it stands: the finished-result check the launcher uses to submit only what is
missing, the sweep records it writes, and ``upbench status``, which reads them.

A job's state comes, in this order, from its finished result (row or weights), from the outcome file the job body
writes when it ends (``<submitit folder>/<job id>_upbench_outcome.json``: JSON, so reading it never runs code;
submitit's own result pickles are never opened), from the scheduler (``sacct``, or ``scontrol`` where accounting is
off), or, for local jobs, from whether the process is alive."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import results
from .errors import UpbenchError


def _run_result(cfg: Dict[str, Any]) -> Tuple[Path, bool]:
    path = results.ResultStore(cfg["paths"]["results"]).path(results.config_hash(cfg))
    return path, path.is_file()


def _train_result(cfg: Dict[str, Any]) -> Tuple[Path, bool]:
    path = results.train_weights_path(cfg)
    try:   # the weights are this config's only if their training log says so
        done = path.is_file() and json.loads(path.with_suffix(".log.json").read_text()).get("config") == cfg
    except (OSError, json.JSONDecodeError):
        done = False
    return path, done


#: primary config name -> cfg -> (the file a finished job leaves, whether it is there for this config); sweeps
#: have none: they keep one row per point and skip finished points themselves
RESULTS: Dict[str, Callable[[Dict[str, Any]], Tuple[Path, bool]]] = {"config": _run_result, "train": _train_result}


def expected_result(config_name: str, cfg: Dict[str, Any]) -> Tuple[Optional[Path], bool]:
    """(the file a finished job of this config leaves or None, whether it is finished already); with ``force``
    nothing counts as finished."""
    entry = RESULTS.get(config_name)
    if entry is None:
        return None, False
    path, done = entry(cfg)
    return path, done and not cfg.get("force")


def _jobs_dir(results_dir: str) -> Path:
    return Path(os.path.expanduser(str(results_dir))).resolve() / "jobs"


def record_path(results_dir: str, sweep: str) -> Path:
    return _jobs_dir(results_dir) / f"{sweep}.json"


# ---------------------------------------------------------------------------------------------------- scheduler
SLURM_STATES = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
                "RESIZING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
                "COMPLETED": "completed", "CANCELLED": "cancelled", "FAILED": "failed", "TIMEOUT": "failed",
                "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed", "PREEMPTED": "failed", "BOOT_FAIL": "failed",
                "DEADLINE": "failed"}


def _command(args: List[str]) -> Optional[str]:
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_state(job_id: str) -> Optional[str]:
    """The raw SLURM state of a job (e.g. ``CANCELLED``), from accounting when it is on, else from the controller
    (which remembers finished jobs for ``MinJobAge`` seconds); None if neither knows the job."""
    out = _command(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"])
    if out and out.strip():
        return out.strip().splitlines()[0].split()[0]
    out = _command(["scontrol", "show", "job", "-o", job_id])
    if out:
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
    return None


def _local_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def outcome_path(folder: str, job_id: str) -> Path:
    """Where a job body leaves its outcome (``{"state": "finished" | "failed", "detail": ...}``)."""
    return Path(folder) / f"{job_id}_upbench_outcome.json"


def write_outcome(folder: str, job_id: str, state: str, detail: str) -> None:
    from .files import atomic_write

    with atomic_write(outcome_path(folder, job_id)) as tmp:
        tmp.write_text(json.dumps({"state": state, "detail": detail}))


def _outcome(record: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(state, detail) from the job's outcome file, if it wrote one (JSON only)."""
    if not record.get("submitit_folder") or not record.get("job_id"):
        return None
    try:
        data = json.loads(outcome_path(record["submitit_folder"], str(record["job_id"])).read_text())
        return str(data["state"]), str(data.get("detail", ""))[:300]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def job_state(record: Dict[str, Any]) -> Dict[str, Any]:
    """``{state, detail, log}`` for one job record: finished | failed | cancelled | running | pending | lost | unknown."""
    if not record.get("submitted", True):
        return {"state": "finished", "detail": "finished before this sweep", "log": None}
    res = record.get("result")
    if res and Path(res).is_file():
        return {"state": "finished", "detail": res, "log": None}
    log = record.get("stderr")
    outcome = _outcome(record)
    if outcome and outcome[0] == "failed":
        return {"state": "failed", "detail": outcome[1], "log": log}
    if outcome and outcome[0] == "finished" and not res:
        return {"state": "finished", "detail": "job returned", "log": None}
    if not record.get("job_id"):
        return {"state": "unknown", "detail": "the record has no job id", "log": log}
    if record.get("executor") == "slurm":
        raw = slurm_state(record["job_id"])
        state = SLURM_STATES.get((raw or "").split()[0].rstrip("+"), "unknown") if raw else "unknown"
        if state == "completed":   # the scheduler says done, but the job left no result
            return {"state": "failed", "detail": "job completed without a result", "log": log}
        return {"state": state, "detail": raw or "not known to the scheduler", "log": log if state in
                ("failed", "cancelled", "unknown") else None}
    if _local_alive(record["job_id"]):
        return {"state": "running", "detail": f"pid {record['job_id']}", "log": None}
    return {"state": "lost", "detail": "process gone without a result (killed?); re-run the command", "log": log}


def sweep_records(results_dir: str) -> List[Path]:
    folder = _jobs_dir(results_dir)
    return sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if folder.is_dir() else []


def status(results_dir: str, sweep: Optional[str] = None) -> List[Dict[str, Any]]:
    """One dict per job of the chosen sweep (default: the latest), with its state."""
    records = sweep_records(results_dir)
    if not records:
        raise UpbenchError(f"no submitted sweeps under {Path(results_dir).resolve() / 'jobs'}; submit with "
                           f"`upbench run -m ... hydra/launcher=slurm` (or hydra/launcher=local)")
    if sweep in (None, "latest"):
        chosen = [records[-1]]
    elif sweep == "all":
        chosen = records
    else:
        chosen = [p for p in records if p.stem == sweep]
        if not chosen:
            raise UpbenchError(f"unknown sweep '{sweep}'; sweeps: {', '.join(p.stem for p in records)}")
    out = []
    for path in chosen:
        data = read_record(path)
        for record in data["jobs"]:
            out.append({"sweep": data["sweep"], **record, **job_state(record)})
    return out


def read_record(path: Path) -> Dict[str, Any]:
    """A sweep record written by the launcher; :class:`UpbenchError` naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UpbenchError(f"{path} is not a readable sweep record ({type(exc).__name__}); delete it (the jobs' rows "
                           "are kept) or re-run the sweep's command") from None
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and {"num", "label", "submitted"} <= set(j)
                                             for j in jobs):
        raise UpbenchError(f"{path} is not a sweep record of upbench (no list of jobs with num / label / submitted); "
                           "delete it or re-run the sweep's command")
    data.setdefault("sweep", path.stem)
    return data


def format_status(jobs: List[Dict[str, Any]]) -> str:
    lines = []
    for sweep in dict.fromkeys(j["sweep"] for j in jobs):
        part = [j for j in jobs if j["sweep"] == sweep]
        counts: Dict[str, int] = {}
        for j in part:
            counts[j["state"]] = counts.get(j["state"], 0) + 1
        lines.append(f"sweep {sweep}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        for j in part:
            line = f"  #{j['num']:<3} {j['state']:<9} {str(j.get('job_id') or '-'):<12} {j['label']}"
            if j["state"] not in ("finished", "running", "pending"):
                line += f"  [{j['detail']}]"
            if j.get("log"):
                line += f"  log: {j['log']}"
            lines.append(line)
    return "\n".join(lines) + "\n"
