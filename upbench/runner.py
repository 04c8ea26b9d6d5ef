"""Runs one configured job: config -> backbone, upsampler, data (builders of :mod:`upbench.pipeline`) -> the task
(found in :data:`upbench.registry.TASKS`) -> one result row (:func:`upbench.schema.build_row`) -> the store."""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, Optional

import torch

from . import results
from .cache import FeatureCache
from .config import resolve_device, to_container
from .dtypes import reduced_dtype
from .errors import RunFailed, UpbenchError
from .pipeline import Pipeline, build_datasets, build_images, build_upsampler, feature_cache, get_backbone
from .protocols import Job
from .registry import TASKS
from .schema import build_row

__all__ = ["run_job", "run_training", "primary_metric", "to_container", "resolve_device"]

#: everything a job says goes through this logger: Hydra's per-job ``.log`` files hold it, the console shows it
logger = logging.getLogger("upbench")


def _check_data(task: Any, dataset: Any) -> None:
    kinds = getattr(task, "dataset_kinds", None)
    kind = getattr(dataset, "kind", "seg")
    if kinds and kind not in kinds:
        name = getattr(dataset, "name", type(dataset).__name__)
        raise UpbenchError(f"task={task.registry_name} needs {task.dataset_hint}; '{name}' is a {kind} dataset")


def check_protocol(cfg: Dict[str, Any]) -> None:
    """A preset (``protocol=<name>``) defines settings for some tasks only; running another task under its name would
    label numbers with a protocol they do not follow."""
    preset = cfg.get("protocol")
    if isinstance(preset, dict) and preset.get("name"):
        tasks = list(preset.get("tasks") or [])
        if tasks and cfg["task"]["name"] not in tasks:
            raise UpbenchError(f"protocol={preset['name']} defines {', '.join(tasks)} only, not "
                               f"task={cfg['task']['name']}; drop the task override or pick another protocol "
                               "(upbench list shows each preset)")


def _check_top(cfg: Dict[str, Any]) -> None:
    """The top-level settings every job reads (checked before a finished row is reused, too)."""
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UpbenchError(f"threads={threads}: expected a positive integer (or null: torch's default)")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UpbenchError(f"seed={seed}: expected a non-negative integer")
    reduced_dtype(cfg.get("compute_dtype"))
    for key in ("tf32", "cudnn_benchmark"):
        if not isinstance(cfg.get(key, False), bool):
            raise UpbenchError(f"{key}={cfg.get(key)}: expected true or false")


def _seed_and_threads(cfg: Dict[str, Any]) -> torch.device:
    _check_top(cfg)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg["threads"]))
    # set explicitly (never inherited from whatever ran before in this process) and recorded in every row
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.get("tf32", False))
    torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", False))
    torch.manual_seed(int(cfg["seed"]))
    return resolve_device(cfg.get("device", "auto"))


def primary_metric(row: Dict[str, Any]) -> Optional[float]:
    """The value a Hydra sweeper optimises for a finished row: its task's primary metric (the table spec's)."""
    task = TASKS.get(row["task"])
    value = (row.get("metrics") or {}).get(task.table.primary_metric.key) if getattr(task, "table", None) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _check_metrics(metrics: Dict[str, Any]) -> None:
    """A number is right or absent: a NaN / infinite metric means the run is degenerate, not a result."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RunFailed(f"degenerate result: {', '.join(f'{k}={metrics[k]}' for k in bad)} (no valid number); "
                        "check the data (labels, ground truth) and the probe's settings")


def run_job(cfg_in: Any, log: Optional[Callable[[str], None]] = None,
            cache: Optional[FeatureCache] = None) -> Dict[str, Any]:
    """Run one configured job, store its row, and return it (or the stored row if it already exists).

    A job that runs but ends without a valid number (diverged, degenerate) raises :class:`RunFailed` after
    recording why in ``<results>/failed/<config_hash>.json``; it never leaves a row."""
    log = log or logger.info
    cfg = to_container(cfg_in)
    _check_top(cfg)
    store = results.ResultStore(cfg["paths"]["results"])
    key = results.config_hash(cfg)
    ident = {"task": cfg["task"]["name"], "upsampler": cfg["upsampler"]["name"], "backbone": cfg["backbone"]["name"],
             "dataset": cfg.get("dataset", {}).get("name")}
    label = " ".join(f"{k}={v}" for k, v in ident.items() if v)
    if store.exists(key) and not cfg.get("force", False):
        try:
            row = store.read(key)
            log(f"[skip] {label}: finished result {store.path(key)} (force=true to redo)")
            return row
        except UpbenchError as exc:   # a corrupt row is not a finished result: keep it aside and redo the run
            moved = store.set_aside(key)
            logger.warning(f"upbench: warning: {exc}; moved to {moved} and running the job again")

    check_protocol(cfg)
    device = _seed_and_threads(cfg)
    task = TASKS.get(cfg["task"]["name"])
    log(f"[run] {label}")
    task.preflight(cfg)
    started, t0 = results.now(), time.perf_counter()
    backbone = get_backbone(cfg["backbone"], device)
    upsampler = build_upsampler(cfg["upsampler"], backbone, device)
    train_set, val_set = build_datasets(cfg["dataset"], disjoint=task.fits_train_split)
    _check_data(task, train_set)
    task_cfg = cfg["task"]
    cache_cfg = task_cfg.get("cache") or {}
    pipe = Pipeline(backbone, upsampler, device, cache if cache is not None else feature_cache(cache_cfg),
                    guidance_norm=task_cfg.get("guidance_norm", "upsampler"),
                    upsampled_budget_gb=float(cache_cfg.get("upsampled_gb", 0.0) or 0.0),
                    input_norm=task_cfg.get("input_norm", "normalised"),
                    backbone_scale=float(task_cfg.get("backbone_scale", 1.0) or 1.0),
                    feature_grid=task_cfg.get("feature_grid"), compute_dtype=cfg.get("compute_dtype"),
                    loader=cfg.get("loader"))
    torch.manual_seed(int(cfg["seed"]))  # again: building (or reusing) models must not shift the task's randomness
    checkpoint = store.checkpoint_path(key)   # long tasks resume from it after a requeue or a re-run
    load_start = results.load_average()
    try:
        out = task.run(Job(cfg={**task_cfg, "seed": cfg["seed"]}, full_cfg=cfg, pipe=pipe, train_set=train_set,
                           val_set=val_set, device=device, seed=int(cfg["seed"]), log=log, checkpoint=checkpoint,
                           out_dir=store.root / "artefacts" / key))
        _check_metrics(out["metrics"])
    except RunFailed as exc:
        path = store.write_failure(build_row(cfg, key, "failed", error=str(exc), versions=results.versions(),
                                             device=results.device_info(device), started=started,
                                             finished=results.now(), wall_s=time.perf_counter() - t0))
        raise RunFailed(f"{exc} [recorded in {path}]") from None
    timing = {**pipe.timing(), **out.get("timing", {}), "load_start": load_start, "load_end": results.load_average()}
    data = {**dict(getattr(val_set, "flags", None) or {}), **out.get("data", {})}
    artefacts = {name: os.path.relpath(path, store.root) for name, path in (out.get("artefacts") or {}).items()
                 if path}
    row = build_row(cfg, key, "ok", metrics=out["metrics"], timing=timing, data=data, note=out.get("note"),
                    params={"upsampler": int(upsampler.num_params)}, artefacts=artefacts,
                    versions=results.versions(), device=results.device_info(device), started=started,
                    finished=results.now(), wall_s=time.perf_counter() - t0)
    path = store.write(row)
    checkpoint.unlink(missing_ok=True)
    if row.get("note"):
        logger.warning(f"upbench: note: {row['note']}")
    log(f"[done] {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in out["metrics"].items()
                                          if isinstance(v, float)) + f" -> {path}")
    return row


def run_training(cfg_in: Any, log: Optional[Callable[[str], None]] = None, progress: bool = True) -> Dict[str, Any]:
    """``upbench train``: backbone + trainable upsampler from the config, trained by the ``train`` task."""
    log = log or logger.info
    cfg = to_container(cfg_in)
    device = _seed_and_threads(cfg)
    task = TASKS.get("train")
    task.preflight(cfg)
    backbone = get_backbone(cfg["backbone"], device)
    torch.manual_seed(int(cfg["seed"]))
    model = build_upsampler(cfg["upsampler"], backbone, device, trainable=True)
    data = build_images(cfg["data"], seed=int(cfg["seed"]))
    _check_data(task, data)
    cache = FeatureCache(enabled=bool(cfg["train"].get("cache_features", True)))
    pipe = Pipeline(backbone, model, device, cache, loader=cfg.get("loader"))
    return task.run(Job(cfg=cfg["train"], full_cfg=cfg, pipe=pipe, train_set=data, val_set=None, device=device,
                        seed=int(cfg["seed"]), log=log, out_dir=results.train_weights_path(cfg).parent,
                        progress=progress))
