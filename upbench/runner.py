"""The one data path every job takes: config -> backbone, upsampler, data -> task -> result row -> store."""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import results
from .backbones import Backbone, create_backbone
from .errors import UpbenchError
from .features import PROCESS_CACHE, FeatureCache

_BACKBONES: Dict[str, Backbone] = {}


def to_container(cfg: Any) -> Dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UpbenchError(f"device={name} requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def get_backbone(cfg: Dict[str, Any], device: torch.device) -> Backbone:
    """Backbones are frozen and stateless: one instance per process and config."""
    key = json.dumps(cfg, sort_keys=True) + str(device)
    if key not in _BACKBONES:
        _BACKBONES[key] = create_backbone(cfg).to(device)
    return _BACKBONES[key]


def build_upsampler(cfg: Dict[str, Any], backbone: Backbone, device: torch.device):
    import upsamplers

    kwargs = dict(cfg.get("kwargs") or {})
    for key in ("in_channels", "patch_size"):
        if key in kwargs:
            raise UpbenchError(f"upsampler.kwargs.{key} is taken from the backbone; remove it from the upsampler config")
    model = upsamplers.create(cfg["name"], weights=cfg.get("weights"), in_channels=backbone.channels,
                              patch_size=backbone.patch_size, **kwargs)
    return model.to(device).eval().requires_grad_(False)


class SliceView(torch.utils.data.Dataset):
    """``split[a:b]``: a contiguous part of a split (e.g. to probe on part of a small folder and test on the rest)."""

    def __init__(self, base: Any, indices: range):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["base"], name)


def _split(spec: str) -> Tuple[str, Optional[slice]]:
    """``"val"`` -> ("val", None); ``"val[10:]"`` -> ("val", slice(10, None))."""
    if "[" not in spec:
        return spec, None
    name, rest = spec.split("[", 1)
    try:
        a, b = rest.rstrip("]").split(":")
        return name, slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise UpbenchError(f"bad split '{spec}'; use name or name[start:stop], e.g. val[:20]") from None


def build_datasets(cfg: Dict[str, Any]) -> Tuple[Any, Any]:
    from .data import DATASETS

    cfg = dict(cfg)
    name = cfg.pop("name")
    train_split, val_split = cfg.pop("train_split", "train"), cfg.pop("val_split", "val")
    limit_train, limit_val = cfg.pop("limit_train", None), cfg.pop("limit_val", None)
    cfg.pop("num_classes", None)
    out = []
    for spec, limit in ((train_split, limit_train), (val_split, limit_val)):
        split, part = _split(str(spec))
        ds = DATASETS.create(name, split=split, **cfg)
        if part is not None:
            ds = SliceView(ds, range(len(ds))[part])
        if limit:
            ds = SliceView(ds, range(min(int(limit), len(ds))))
        out.append(ds)
    return out[0], out[1]


_DISK_CACHES: Dict[str, FeatureCache] = {}


def feature_cache(cache_cfg: Dict[str, Any]) -> FeatureCache:
    """The process-wide in-memory cache, a persistent one under ``task.cache.dir``, or none."""
    if not cache_cfg.get("features", True):
        return FeatureCache(enabled=False)
    directory = cache_cfg.get("dir")
    if not directory:
        return PROCESS_CACHE
    return _DISK_CACHES.setdefault(str(directory), FeatureCache(directory=str(directory)))


def job_identity(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {"task": cfg["task"]["name"], "upsampler": cfg["upsampler"]["name"],
            "backbone": cfg["backbone"]["name"], "dataset": cfg.get("dataset", {}).get("name")}


def run_job(cfg_in: Any, log: Callable[[str], None] = print, cache: Optional[FeatureCache] = None) -> Dict[str, Any]:
    """Run one configured job, store its row, and return it (or the stored row if it already exists)."""
    import tasks

    cfg = to_container(cfg_in)
    store = results.ResultStore(cfg["paths"]["results"])
    key = results.config_hash(cfg)
    ident = job_identity(cfg)
    label = " ".join(f"{k}={v}" for k, v in ident.items() if v)
    if store.exists(key) and not cfg.get("force", False):
        log(f"[skip] {label}: finished result {store.path(key)} (force=true to redo)")
        return store.read(key)

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg["seed"]))
    device = resolve_device(cfg.get("device", "auto"))
    task_fn = tasks.get(cfg["task"]["name"])
    log(f"[run] {label}")
    if getattr(task_fn, "preflight", None):
        task_fn.preflight(cfg)
    started, t0 = results.now(), time.perf_counter()
    backbone = get_backbone(cfg["backbone"], device)
    upsampler = build_upsampler(cfg["upsampler"], backbone, device)
    train_set, val_set = build_datasets(cfg["dataset"])
    if cache is None:
        cache = feature_cache(cfg["task"].get("cache", {}))
    torch.manual_seed(int(cfg["seed"]))  # again: building (or reusing) models must not shift the task's randomness
    checkpoint = store.checkpoint_path(key)   # long tasks resume from it after a requeue or a re-run
    out = task_fn({**cfg["task"], "seed": cfg["seed"], "checkpoint": str(checkpoint)}, backbone, upsampler,
                  train_set, val_set, device, cache, log)
    row = {
        "config_hash": key, **ident, "seed": cfg["seed"], "status": "ok",
        "params": {"upsampler": int(upsampler.num_params)},
        **out,
        "config": cfg, "versions": results.versions(), "device": results.device_info(device),
        "started": started, "finished": results.now(), "wall_s": time.perf_counter() - t0,
    }
    path = store.write(row)
    checkpoint.unlink(missing_ok=True)
    log(f"[done] {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in out["metrics"].items()
                                          if isinstance(v, float)) + f" -> {path}")
    return row


def run_training(cfg_in: Any, log: Callable[[str], None] = print, progress: bool = True) -> Dict[str, Any]:
    """``upbench train``: build backbone + upsampler from the config and train with the multi-depth loss."""
    from tasks.train import train

    cfg = to_container(cfg_in)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = resolve_device(cfg.get("device", "auto"))
    backbone = get_backbone(cfg["backbone"], device)
    torch.manual_seed(int(cfg["seed"]))
    model = build_upsampler(cfg["upsampler"], backbone, device)
    model.requires_grad_(True)
    return train(cfg, backbone, model, device, log=log, progress=progress)
