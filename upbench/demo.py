"""``upbench demo``: everything upbench does, offline, in a few minutes on a laptop CPU -- the segmentation probe on
the embedded demo set for every registered upsampler, the depth probe and the step stability for a few, the quick
scaling sweep, every figure kind, and the HTML report (``<results>/report/index.html``).  What runs is
``configs/demo.yaml``; a method whose upsampling would take more floating-point operations than the demo's budget
is listed with its estimate instead of run (a count, so a loaded machine runs the same methods as a quiet one)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .config import compose, config_dir, config_options, resolve_device, to_container
from .pipeline import build_upsampler, get_backbone
from .registry import UPSAMPLERS
from .results import ResultStore, config_hash, device_info
from .runner import run_job
from .schema import build_row


def demo_spec() -> Dict[str, Any]:
    import yaml

    return yaml.safe_load((config_dir() / "demo.yaml").read_text())


def estimate_seg_gflops(cfg: Dict[str, Any]) -> Tuple[float, float, int]:
    """(GFLOP of all the upsampler calls of one seg job, GFLOP per call, params): matmul / conv operations of one
    call at the job's shapes (``torch.utils.flop_counter``) times the number of distinct calls the probe makes
    (train images x flips + val images)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = resolve_device(cfg.get("device", "auto"))
    backbone = get_backbone(cfg["backbone"], device)
    model = build_upsampler(cfg["upsampler"], backbone, device)
    ds = cfg["dataset"]
    size = int(ds["img_size"])
    grid = size // backbone.patch_size
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, size, size, device=device), torch.randn(1, backbone.channels, grid, grid,
                                                                        device=device), (size, size))
    per_call = counter.get_total_flops() / 1e9
    n_train = int(ds.get("num_images", 0) or 0)
    n_val = int(ds.get("limit_val") or n_train)
    calls = n_train * (2 if cfg["task"]["probe"]["flip"] else 1) + n_val
    return per_call * calls, per_call, int(model.num_params)


def _cfg(spec: Dict[str, Any], name: str, extra: Sequence[str], rest: Sequence[str]) -> Dict[str, Any]:
    """A demo job's config: the upsampler, the demo's common overrides, the section's, the upsampler's own, then those
    of the command line's that this job has (``task.probe.epochs=1`` shortens the probes, not the stability run)."""
    per = list((spec.get("upsampler_overrides") or {}).get(name, []))
    base = [f"upsampler={name}"] + list(spec["overrides"]) + list(extra) + per
    return to_container(compose(base + applicable(compose(base), rest)))


def applicable(cfg: Any, overrides: Sequence[str]) -> List[str]:
    """The overrides whose key exists in ``cfg`` (or that choose a config group, or add with ``+``)."""
    from omegaconf import OmegaConf

    keep = []
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if key.startswith(("+", "~")) or key in ("task", "upsampler", "backbone", "dataset") or \
                OmegaConf.select(cfg, key, default="__missing__") != "__missing__":
            keep.append(ov)
    return keep


def run_seg(spec: Dict[str, Any], names: Sequence[str], rest: Sequence[str],
            log: Callable[[str], None]) -> List[Dict[str, Any]]:
    budget = float(spec.get("flop_budget_gflops") or 0)
    skip = dict(spec.get("skip") or {})
    shown: List[Dict[str, Any]] = []
    for name in names:
        cfg = _cfg(spec, name, spec.get("seg") or [], rest)
        key = config_hash(cfg)

        def not_run(note: str, params: int = 0) -> Dict[str, Any]:
            return build_row(cfg, key, "skipped", note=f"not run: {note}", params={"upsampler": params},
                             device=device_info(resolve_device(cfg.get("device", "auto"))))

        if name in skip:
            log(f"[skip] {name}: {skip[name]}")
            shown.append(not_run(skip[name]))
            continue
        if budget and not ResultStore(cfg["paths"]["results"]).exists(key) and not cfg.get("force"):
            total, per_call, params = estimate_seg_gflops(cfg)
            if total > budget:
                note = f"over the demo's budget: ~{total:.0f} GFLOP of upsampling > {budget:.0f}"
                log(f"[skip] {name}: {note} ({per_call:.1f} GFLOP per call)")
                shown.append(not_run(note, params))
                continue
        shown.append(run_job(cfg, log=log))
    return shown


def main(argv: Sequence[str], log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    from . import report, scaling, viz
    from .report.html import write_report
    from .viz import models, rows as row_figures

    t0 = time.perf_counter()
    spec = demo_spec()
    chosen = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("upsampler=")]
    names = chosen[0] if chosen else [n for n in UPSAMPLERS.available() if n in config_options("upsampler")]
    rest = [a for a in argv if not a.startswith("upsampler=")]
    results = Path(str(compose(list(spec["overrides"]) + list(spec.get("seg") or []) + rest).paths.results)).resolve()
    figures_dir = results / "figures"
    wanted = set(spec.get("figures") or viz.KINDS)

    log("== segmentation probe (every upsampler)")
    rows = run_seg(spec, names, rest, log)
    ran = [r["upsampler"] for r in rows if r["status"] == "ok"]
    for section in ("depth", "stability"):
        part = spec.get(section) or {}
        todo = [n for n in part.get("upsamplers", []) if n in ran]
        if todo:
            log(f"== {section} ({', '.join(todo)})")
            rows += [run_job(_cfg(spec, n, part.get("overrides", []), rest), log=log) for n in todo]
    if "scaling" in wanted:
        log("== scaling sweep (the quick grid)")
        covered = [n for n in ran if n not in (spec.get("skip") or {})]
        sweep_cfg = to_container(compose([f"paths.results={results}", f"upsamplers=[{','.join(covered)}]"]
                                         + list((spec.get("sweep") or {}).get("overrides", [])),
                                         config_name="sweep/scaling"))
        scaling.run_sweep({k: v for k, v in sweep_cfg.items() if k != "use_quick"}, quick=True, log=log)
    log("== figures")
    per_upsampler = {n: v for n, v in (spec.get("upsampler_overrides") or {}).items()}
    feature_methods = [n for n in ran if n not in (spec.get("skip") or {})]
    seg_overrides = list(spec["overrides"]) + list(spec.get("seg") or []) + rest
    made: List[str] = []
    if "pca" in wanted and feature_methods:
        made += models.pca(models.configs_for(feature_methods, seg_overrides, per_upsampler), figures_dir)
    steps_methods = [n for n in (spec.get("stability") or {}).get("upsamplers", []) if n in feature_methods]
    if "steps" in wanted and steps_methods:
        made += models.steps(models.configs_for(steps_methods, seg_overrides, per_upsampler), figures_dir)
    if "train" in wanted:
        made += row_figures.training([Path(__file__).parent / "assets" / "uplift_demo.log.json"], figures_dir)
    log("\n".join(f"  {p}" for p in made if p.endswith(".png")))
    page = write_report(str(results), str(results / "report"))
    log("")
    log(report.render(rows, "markdown"))
    log(f"demo wall time: {time.perf_counter() - t0:.1f} s (results in {results})")
    log(f"report: {page}  (open it in a browser, e.g. xdg-open {page})")
    return rows
