"""``upbench <verb> [hydra overrides]`` -- a thin layer: parse the verb, compose the config, call one function.

  upbench run task=seg upsampler=uplift dataset=voc backbone=dinov2_s14 [-m for multirun]
  upbench train upsampler=uplift backbone=demo data.root=builtin:skimage   # multi-depth self-supervised training
  upbench demo                      # seg on the embedded demo set for every registered upsampler
  upbench list                      # upsamplers, tasks, backbones, datasets
  upbench sweep scaling [--quick] [overrides]   # time / memory / FLOPs vs tokens for every upsampler
  upbench report [--latex|--csv] [--paper] [--scaling [--plot PNG]] [--results DIR]
  upbench status [--sweep NAME|latest|all]    # finished / running / failed jobs of a submitted sweep
  any of run / train / sweep + hydra/launcher=slurm [cluster=<preset>] (or hydra/launcher=local): submitted
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
    import slurm

    root = Path((slurm if group == "cluster" else configs).__file__).parent
    folder = root / group
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


LAUNCHERS = ("slurm", "local", "basic", "submitit_slurm", "submitit_local")


def launcher_overrides(overrides: List[str], multirun: bool) -> Tuple[List[str], bool]:
    """``cluster=<preset>`` implies ``hydra/launcher=slurm``; choosing a launcher implies a multirun (Hydra only
    launches jobs in multirun mode), so ``upbench run ... hydra/launcher=slurm`` submits even a single job."""
    launcher = [o for o in overrides if o.startswith("hydra/launcher=")]
    for o in launcher:
        if o.split("=", 1)[1] not in LAUNCHERS:
            _fail(f"unknown launcher '{o.split('=', 1)[1]}'; launchers: {', '.join(LAUNCHERS)}")
    clusters = [o for o in overrides if o.startswith("cluster=")]
    for o in clusters:
        name = o.split("=", 1)[1]
        if name not in config_options("cluster"):
            _fail(f"unknown cluster preset '{name}'; presets (slurm/cluster/): {', '.join(config_options('cluster'))}")
    if clusters and not launcher:
        overrides = overrides + ["hydra/launcher=slurm"]
        launcher = ["hydra/launcher=slurm"]
    return overrides, multirun or any(o.split("=", 1)[1] != "basic" for o in launcher)


def _hydra_main(overrides: List[str], multirun: bool, config_name: str, job: Callable[[Any], Any]) -> None:
    import hydra
    from omegaconf import DictConfig

    from hydra.core.plugins import Plugins
    from hydra_plugins.upbench_launcher import launcher

    for cls in (launcher.UpbenchSlurmLauncher, launcher.UpbenchLocalLauncher):
        Plugins.instance().register(cls)   # editable installs hide them from Hydra's namespace scan
    @hydra.main(version_base=None, config_path="pkg://configs", config_name=config_name)
    def _entry(cfg: DictConfig) -> None:
        in_job = bool(os.environ.get("SUBMITIT_EXECUTOR"))
        try:
            job(cfg)
        except Exception as exc:
            if in_job:   # a submitted job: the error goes to the job's log and to submitit (`upbench status`)
                import traceback

                traceback.print_exc()
                raise
            if isinstance(exc, UpbenchError):
                _fail(str(exc))
            raise

    overrides, multirun = launcher_overrides(overrides, multirun)
    sys.argv = ["upbench"] + (["-m"] if multirun else []) + overrides
    launcher.FAILED.clear()
    _entry()
    if launcher.FAILED:
        print(f"upbench: {len(launcher.FAILED)} job(s) failed; finished results are kept; re-run the same command "
              f"to run only what is missing:", file=sys.stderr)
        for f in launcher.FAILED:
            print(f"  {f['label']}: job {f['job_id']}: {f['reason']} (log: {f['log']})", file=sys.stderr)
        sys.exit(1)


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
    print(f"clusters (slurm/cluster/): {', '.join(config_options('cluster'))}")


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


def _sweep_job(cfg: Any) -> None:
    from . import report, scaling
    from .runner import to_container

    cfg = to_container(cfg)
    rows = scaling.run_sweep({k: v for k, v in cfg.items() if k != "use_quick"}, quick=bool(cfg.get("use_quick")))
    print()
    print(report.render(rows, "markdown", scaling=True))
    if cfg.get("plot", True):
        dev = rows[0]["config"]["device"]["type"] if rows else "cpu"
        png = Path(cfg["paths"]["results"]) / "scaling" / f"scaling_{cfg['backbone']['name']}_{dev}.png"
        print(f"figure: {report.scaling_figure(rows, str(png), log_scale=bool(cfg.get('log_scale', True)))}")


def cmd_sweep(argv: List[str]) -> None:
    """``upbench sweep <name> [--quick] [overrides]``: a measurement sweep defined by configs/sweep/<name>.yaml;
    with ``hydra/launcher=slurm`` the whole sweep runs as one job (its points stay sequential: a point's size
    limit depends on the previous ones)."""
    sweeps = config_options("sweep")
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        _fail(f"which sweep? usage: upbench sweep <name> [--quick] [overrides]; sweeps: {', '.join(sweeps)}")
    name, rest = argv[0], argv[1:]
    if name not in sweeps:
        _fail(f"unknown sweep '{name}'; sweeps: {', '.join(sweeps)}")
    quick = "--quick" in rest
    overrides = [a for a in rest if a != "--quick"]
    flags = [a for a in overrides if a.startswith("-") and a not in ("-m", "--multirun")]
    if flags:
        _fail(f"unknown option {flags[0]} for upbench sweep (options: --quick; the rest are key=value overrides)")
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    overrides = [a for a in overrides if a not in ("-m", "--multirun")]
    validate_overrides(overrides)
    _hydra_main(overrides + (["use_quick=true"] if quick else []), multirun, f"sweep/{name}", _sweep_job)


def cmd_status(argv: List[str]) -> None:
    """``upbench status [--sweep NAME|latest|all] [--results DIR]``: finished / running / failed jobs of a
    submitted sweep, with the log of each failure."""
    from . import jobs

    parser = argparse.ArgumentParser(prog="upbench status")
    parser.add_argument("--sweep", default="latest", help="a sweep name (see results/jobs/), latest or all")
    parser.add_argument("--results", default=os.environ.get("UPBENCH_RESULTS", "results"))
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    args = parser.parse_args(argv)
    found = jobs.status(args.results, args.sweep)
    if args.json:
        import json

        for j in found:
            print(json.dumps(j, default=str))
    else:
        sys.stdout.write(jobs.format_status(found))


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
            "report": cmd_report, "status": cmd_status}


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
