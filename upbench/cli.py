"""``upbench <verb> [hydra overrides]`` -- a thin layer: parse the verb, compose the config, call one function.

  upbench run task=seg upsampler=uplift dataset=voc backbone=dinov2_s14 [-m for multirun]
  upbench train upsampler=uplift backbone=demo data.root=builtin:skimage   # multi-depth self-supervised training
  upbench demo                      # seg on the embedded demo set for every registered upsampler
  upbench list                      # upsamplers, tasks, backbones, datasets
  upbench sweep scaling [--quick] [overrides]   # time / memory / FLOPs vs tokens for every upsampler
  upbench report [--latex|--csv] [--paper] [--scaling [--plot PNG]] [--results DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import upbench  # noqa: F401  (torchvision fallback first)
from .errors import UpbenchError

GROUPS = ("task", "upsampler", "backbone", "dataset")


def _fail(msg: str) -> NoReturn:
    print(f"upbench: error: {msg}", file=sys.stderr)
    sys.exit(2)


def config_options(group: str) -> List[str]:
    import configs

    folder = Path(configs.__file__).parent / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def registered(group: str) -> List[str]:
    if group == "upsampler":
        import upsamplers

        return upsamplers.available()
    if group == "task":
        import tasks

        return tasks.available()
    return config_options(group)


def validate_overrides(overrides: Sequence[str]) -> None:
    """Check ``group=name[,name...]`` choices before Hydra runs, so a typo gives one line and exit code 2."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS:
            continue
        valid = set(config_options(key))
        if key in ("upsampler", "task"):
            valid &= set(registered(key))
        for name in value.split(","):
            if name and name not in valid and not any(ch in name for ch in "()[]{}$"):
                _fail(f"unknown {key} '{name}'; available {key}s: {', '.join(sorted(valid))}")


def _hydra_main(overrides: List[str], multirun: bool, config_name: str, job: Callable[[Any], Any]) -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base=None, config_path="pkg://configs", config_name=config_name)
    def _entry(cfg: DictConfig) -> None:
        try:
            job(cfg)
        except UpbenchError as exc:
            _fail(str(exc))

    sys.argv = ["upbench"] + (["-m"] if multirun else []) + overrides
    _entry()


def _run_job(cfg: Any) -> None:
    from .runner import run_job

    run_job(cfg)


def _train_job(cfg: Any) -> None:
    from .runner import run_training

    run_training(cfg)


def compose(overrides: Sequence[str], config_name: str = "config"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="configs", version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def cmd_run(argv: List[str]) -> None:
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    validate_overrides(overrides)
    _hydra_main(overrides, multirun, "config", _run_job)


def cmd_train(argv: List[str]) -> None:
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    validate_overrides(overrides)
    _hydra_main(overrides, multirun, "train", _train_job)


def cmd_list(_: List[str]) -> None:
    for group in GROUPS:
        print(f"{group}s: {', '.join(registered(group))}")
    print(f"sweeps: {', '.join(config_options('sweep'))}")


def demo_spec() -> Dict[str, object]:
    from omegaconf import OmegaConf

    import configs

    return OmegaConf.to_container(OmegaConf.load(Path(configs.__file__).parent / "demo.yaml"))  # type: ignore


def estimate_seg_seconds(cfg: Dict[str, Any]) -> Tuple[float, float, int]:
    """(estimated upsampler seconds for one seg job, seconds per call, params): the fastest of three timed calls at the job's shapes
    times the number of distinct upsampler calls the probe makes (train images x flips + val images)."""
    import time

    import torch

    from .runner import build_upsampler, get_backbone, resolve_device

    device = resolve_device(cfg.get("device", "auto"))
    backbone = get_backbone(cfg["backbone"], device)
    model = build_upsampler(cfg["upsampler"], backbone, device)
    ds = cfg["dataset"]
    size = int(ds["img_size"])
    grid = size // backbone.patch_size
    image = torch.randn(1, 3, size, size, device=device)
    feats = torch.randn(1, backbone.channels, grid, grid, device=device)
    with torch.inference_mode():
        model(image, feats, (size, size))
        calls = []
        for _ in range(3):  # the fastest of three: one call on a busy machine can be many times slower
            t0 = time.perf_counter()
            model(image, feats, (size, size))
            calls.append(time.perf_counter() - t0)
        per_call = min(calls)
    n_train = int(ds.get("num_images", 0) or 0)
    n_val = int(ds.get("limit_val") or n_train)
    calls = n_train * (2 if cfg["task"]["probe"]["flip"] else 1) + n_val
    return per_call * calls, per_call, int(model.num_params)


def cmd_demo(argv: List[str]) -> None:
    """Seg probe on the embedded demo set with the demo backbone, once per registered upsampler."""
    import time

    from . import report
    from .results import ResultStore, config_hash
    from .runner import run_job, to_container

    validate_overrides(argv)
    spec = demo_spec()
    chosen = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("upsampler=")]
    names = chosen[0] if chosen else [n for n in registered("upsampler") if n in config_options("upsampler")]
    rest = [a for a in argv if not a.startswith("upsampler=")]
    budget = float(spec.get("time_budget_s") or 0)
    skip = dict(spec.get("skip") or {})
    t0 = time.perf_counter()
    shown: List[Dict[str, Any]] = []
    results_dir = "results"
    for name in names:
        extra = list((spec.get("upsampler_overrides") or {}).get(name, []))
        cfg = to_container(compose([f"upsampler={name}"] + list(spec["overrides"]) + extra + rest))
        results_dir = cfg["paths"]["results"]
        stub = {"task": "seg", "upsampler": name, "backbone": cfg["backbone"]["name"], "status": "skipped",
                "dataset": cfg["dataset"]["name"], "config": cfg, "params": {"upsampler": 0}, "timing": {}}
        if name in skip:
            print(f"[skip] {name}: {skip[name]}")
            shown.append({**stub, "note": f"not run: {skip[name]}"})
            continue
        if budget and not ResultStore(results_dir).exists(config_hash(cfg)) and not cfg.get("force"):
            est, per_call, params = estimate_seg_seconds(cfg)
            if est > budget:
                note = f"too slow for the demo budget: ~{est:.0f} s of upsampling > {budget:.0f} s"
                print(f"[skip] {name}: {note} ({per_call * 1e3:.0f} ms per call)")
                shown.append({**stub, "note": note, "params": {"upsampler": params},
                              "timing": {"upsampler_ms": per_call * 1e3}})
                continue
        shown.append(run_job(cfg))
    print()
    print(report.render(shown, "markdown"))
    print(f"demo wall time: {time.perf_counter() - t0:.1f} s (results in {Path(results_dir).resolve()})")


def cmd_sweep(argv: List[str]) -> None:
    """``upbench sweep <name> [--quick] [overrides]``: a measurement sweep defined by configs/sweep/<name>.yaml."""
    from . import report, scaling
    from .runner import to_container

    sweeps = config_options("sweep")
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        _fail(f"which sweep? usage: upbench sweep <name> [--quick] [overrides]; sweeps: {', '.join(sweeps)}")
    name, rest = argv[0], argv[1:]
    if name not in sweeps:
        _fail(f"unknown sweep '{name}'; sweeps: {', '.join(sweeps)}")
    quick = "--quick" in rest
    overrides = [a for a in rest if a != "--quick"]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        _fail(f"unknown option {flags[0]} for upbench sweep (options: --quick; the rest are key=value overrides)")
    validate_overrides(overrides)
    cfg = to_container(compose(overrides, config_name=f"sweep/{name}"))
    rows = scaling.run_sweep(cfg, quick=quick)
    print()
    print(report.render(rows, "markdown", scaling=True))
    if cfg.get("plot", True):
        dev = rows[0]["config"]["device"]["type"] if rows else "cpu"
        png = Path(cfg["paths"]["results"]) / "scaling" / f"scaling_{cfg['backbone']['name']}_{dev}.png"
        print(f"figure: {report.scaling_figure(rows, str(png), log_scale=bool(cfg.get('log_scale', True)))}")


def cmd_report(argv: List[str]) -> None:
    from . import report
    from .results import ResultStore

    parser = argparse.ArgumentParser(prog="upbench report")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--latex", action="store_true", help="booktabs LaTeX (best bold, second underlined)")
    fmt.add_argument("--csv", action="store_true")
    parser.add_argument("--paper", action="store_true", help="add the published reference rows")
    parser.add_argument("--scaling", action="store_true", help="the scaling sweep tables (upbench sweep scaling)")
    parser.add_argument("--plot", metavar="PNG", help="with --scaling: also write the time/memory figure here")
    parser.add_argument("--results", default=os.environ.get("UPBENCH_RESULTS", "results"))
    args = parser.parse_args(argv)
    if args.plot and not args.scaling:
        _fail("--plot needs --scaling")
    rows = ResultStore(args.results).rows()
    kind = "latex" if args.latex else "csv" if args.csv else "markdown"
    sys.stdout.write(report.render(rows, kind, paper=args.paper, scaling=args.scaling))
    if args.plot:
        png = report.scaling_figure(rows, args.plot)
        print(f"figure: {png}" if png else "no scaling rows to plot", file=sys.stderr)


COMMANDS = {"run": cmd_run, "train": cmd_train, "demo": cmd_demo, "list": cmd_list, "sweep": cmd_sweep,
            "report": cmd_report}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        _fail(f"unknown command '{verb}'; commands: {', '.join(COMMANDS)}")
    try:
        COMMANDS[verb](rest)
    except UpbenchError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
