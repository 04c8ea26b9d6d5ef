"""``upbench demo``: the segmentation probe on the embedded demo set with the demo backbone (no downloads), once per
registered upsampler, then the table.  What runs is ``configs/demo.yaml``; a method whose estimated upsampling time
exceeds the demo's budget is listed with its estimate instead of run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .config import compose, config_dir, config_options, resolve_device, to_container
from .pipeline import Pipeline, build_upsampler, get_backbone
from .registry import UPSAMPLERS
from .results import ResultStore, config_hash, device_info
from .runner import run_job
from .schema import build_row


def demo_spec() -> Dict[str, Any]:
    import yaml

    return yaml.safe_load((config_dir() / "demo.yaml").read_text())


def estimate_seg_seconds(cfg: Dict[str, Any]) -> Tuple[float, float, int]:
    """(estimated upsampler seconds for one seg job, seconds per call, params): the fastest of three timed calls at
    the job's shapes (through the pipeline, so the device is synchronised) times the number of distinct upsampler
    calls the probe makes (train images x flips + val images)."""
    device = resolve_device(cfg.get("device", "auto"))
    backbone = get_backbone(cfg["backbone"], device)
    pipe = Pipeline(backbone, build_upsampler(cfg["upsampler"], backbone, device), device)
    ds = cfg["dataset"]
    size = int(ds["img_size"])
    grid = size // backbone.patch_size
    image = torch.rand(1, 3, size, size)
    feats = torch.randn(1, backbone.channels, grid, grid)
    for _ in range(4):   # one warm-up, then the fastest of three: one call on a busy machine can be much slower
        pipe.upsample(image, feats, (size, size))
    per_call = min(pipe.upsampler_s[1:])
    n_train = int(ds.get("num_images", 0) or 0)
    n_val = int(ds.get("limit_val") or n_train)
    calls = n_train * (2 if cfg["task"]["probe"]["flip"] else 1) + n_val
    return per_call * calls, per_call, int(pipe.upsampler.num_params)


def run_demo(argv: Sequence[str], log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Run (or reuse) the demo's jobs; returns their rows, with a ``skipped`` row for each method not run."""
    spec = demo_spec()
    chosen = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("upsampler=")]
    names = chosen[0] if chosen else [n for n in UPSAMPLERS.available() if n in config_options("upsampler")]
    rest = [a for a in argv if not a.startswith("upsampler=")]
    budget = float(spec.get("time_budget_s") or 0)
    skip = dict(spec.get("skip") or {})
    shown: List[Dict[str, Any]] = []
    for name in names:
        extra = list((spec.get("upsampler_overrides") or {}).get(name, []))
        cfg = to_container(compose([f"upsampler={name}"] + list(spec["overrides"]) + extra + list(rest)))
        key = config_hash(cfg)

        def not_run(note: str, params: int = 0, per_call_ms: Any = None) -> Dict[str, Any]:
            return build_row(cfg, key, "skipped", note=f"not run: {note}", params={"upsampler": params},
                             timing={"upsampler_ms": per_call_ms},
                             device=device_info(resolve_device(cfg.get("device", "auto"))))

        if name in skip:
            log(f"[skip] {name}: {skip[name]}")
            shown.append(not_run(skip[name]))
            continue
        if budget and not ResultStore(cfg["paths"]["results"]).exists(key) and not cfg.get("force"):
            est, per_call, params = estimate_seg_seconds(cfg)
            if est > budget:
                note = f"too slow for the demo budget: ~{est:.0f} s of upsampling > {budget:.0f} s"
                log(f"[skip] {name}: {note} ({per_call * 1e3:.0f} ms per call)")
                shown.append(not_run(note, params, per_call * 1e3))
                continue
        shown.append(run_job(cfg, log=log))
    return shown


def results_dir(argv: Sequence[str]) -> Path:
    spec = demo_spec()
    cfg = compose(list(spec["overrides"]) + [a for a in argv if not a.startswith("upsampler=")])
    return Path(str(cfg.paths.results)).resolve()


def main(argv: Sequence[str], log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    from . import report

    t0 = time.perf_counter()
    rows = run_demo(argv, log)
    log("")
    log(report.render(rows, "markdown"))
    log(f"demo wall time: {time.perf_counter() - t0:.1f} s (results in {results_dir(argv)})")
    return rows
