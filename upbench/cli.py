"""The ``upbench`` command: parse the verb, check the arguments, compose the config, call one function.  Every
error a user can cause ends as one line on stderr and a non-zero exit (2 for usage errors), never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

from .config import compose, config_options, register_resolvers
from .errors import UpbenchError
from .overrides import check as check_overrides
from .overrides import HYDRA_FLAGS, check_results_dir, prints_only, quote_non_ascii, split_args

HELP = """usage: upbench <command> [options] [key=value overrides]

commands:
  run       one job, or a multirun (-m): upbench run task=seg upsampler=uplift dataset=voc
  train     train an iterative upsampler: upbench train upsampler=uplift backbone=dinov2_s14 data.root=/data
  sweep     a measurement sweep: upbench sweep scaling [--quick]
  demo      the offline demo: probes, the quick sweep, figures and the HTML report
  report    the papers' tables from the results: upbench report [--latex|--csv] [--paper] [--html DIR]
  viz       figures: upbench viz scaling|pca|steps|predictions|perclass|train
  status    jobs of a submitted sweep: upbench status [--sweep NAME|latest|all]
  list      upsamplers, tasks, backbones, datasets, protocols, sweeps

run, train, sweep and demo take Hydra overrides (key=value, -m, --cfg job, --info, --resolve, --help);
hydra/launcher=slurm [cluster=<preset>] submits the same jobs to SLURM.

options: --version, --help, --shell-completion install=bash|zsh|fish (prints a script to source)
"""

GROUPS = ("task", "upsampler", "backbone", "dataset", "protocol")
LAUNCHERS = ("slurm", "local", "basic", "submitit_slurm", "submitit_local")

__all__ = ["main", "compose", "config_options"]


def _fail(msg: str, code: int = 2) -> NoReturn:
    print(f"upbench: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with upbench's one-line errors."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        _fail(f"{self.prog}: {message} (see {self.prog} --help)")


def report_exception(exc: BaseException) -> NoReturn:
    """The one place an exception becomes what the user sees: one line and an exit code."""
    if isinstance(exc, KeyboardInterrupt):
        print("upbench: interrupted; finished results are kept and an unfinished probe resumes from its checkpoint "
              "when the same command runs again", file=sys.stderr)
        sys.exit(130)
    if isinstance(exc, UpbenchError):
        _fail(str(exc), getattr(exc, "exit_code", 2))
    if isinstance(exc, MemoryError):
        _fail("out of memory; use a smaller dataset.img_size or task.probe.batch_size, or a machine with more memory",
              1)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        _fail(f"cannot access{where}: {exc.strerror or exc}; check the path and its permissions (paths.results, "
              f"dataset.root, ...)", 1)
    if os.environ.get("UPBENCH_DEBUG"):
        raise exc
    _fail(f"unexpected {type(exc).__name__}: {exc}; please report it (UPBENCH_DEBUG=1 shows where it happened)", 1)


def registered(group: str) -> List[str]:
    """Names a user can pick for a config group: YAML files, restricted to registered plugins where there are any."""
    from .registry import TASKS, UPSAMPLERS

    names = config_options(group)
    registry = {"upsampler": UPSAMPLERS, "task": TASKS}.get(group)
    return [n for n in names if n in registry] if registry is not None else names


def validate_overrides(overrides: Sequence[str]) -> None:
    """Check ``group=name[,name...]`` choices before Hydra runs, so a typo gives one line and exit code 2."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS:
            continue
        valid = set(registered(key)) if key in ("upsampler", "task") else set(config_options(key))
        for name in value.split(","):
            if name and name not in valid and not any(ch in name for ch in "()[]{}$"):
                _fail(f"unknown {key} '{name}'; available {key}s: {', '.join(sorted(valid))}")


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

    overrides, multirun = launcher_overrides(overrides, multirun)
    register_resolvers()
    failed: List[dict] = []
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra/launcher=")]
    if any(name != "basic" for name in chosen):
        import importlib.util

        for module in ("submitit",) + (("hydra_plugins.hydra_submitit_launcher",) if any(
                name.startswith("submitit_") for name in chosen) else ()):
            if importlib.util.find_spec(module) is None:
                _fail(f"hydra/launcher={chosen[0]} needs the optional package {module.split('.')[-1].replace('_', '-')}"
                      f"; install it with pip install 'upbench[slurm]'")
        from hydra.core.plugins import Plugins

        from hydra_plugins.upbench_launcher import launcher

        for cls in (launcher.UpbenchSlurmLauncher, launcher.UpbenchLocalLauncher):
            Plugins.instance().register(cls)   # editable installs hide them from Hydra's namespace scan
        launcher.FAILED.clear()
        failed = launcher.FAILED

    @hydra.main(version_base=None, config_path="pkg://upbench.configs", config_name=config_name)
    def _entry(cfg: DictConfig) -> Any:
        in_job = bool(os.environ.get("SUBMITIT_EXECUTOR"))
        try:
            return job(cfg)   # the job's primary metric: what a Hydra sweeper optimises
        except Exception as exc:
            if in_job:   # a submitted job: the error goes to the job's log and its outcome (`upbench status`)
                import traceback

                traceback.print_exc()
                raise
            report_exception(exc)

    sys.argv = ["upbench"] + (["-m"] if multirun else []) + overrides
    _entry()
    if failed:
        print(f"upbench: {len(failed)} job(s) failed; finished results are kept; re-run the same command "
              f"to run only what is missing:", file=sys.stderr)
        for f in failed:
            print(f"  {f['label']}: job {f['job_id']}: {f['reason']} (log: {f['log']})", file=sys.stderr)
        sys.exit(1)


def _run_job(cfg: Any) -> Any:
    from .runner import primary_metric, run_job

    return primary_metric(run_job(cfg))


def _train_job(cfg: Any) -> None:
    from .runner import run_training

    run_training(cfg)


def _sweep_job(cfg: Any) -> None:
    from . import report, scaling
    from .config import to_container

    cfg = to_container(cfg)
    rows = scaling.run_sweep({k: v for k, v in cfg.items() if k != "use_quick"}, quick=bool(cfg.get("use_quick")))
    print()
    print(report.render(rows, "markdown", scaling=True))
    if cfg.get("plot", True):
        from .viz import rows as figures

        for path in figures.scaling(rows, Path(cfg["paths"]["results"]) / "figures",
                                    log_scale=bool(cfg.get("log_scale", True))):
            print(f"figure: {path}")


def prepare(argv: Sequence[str], config_name: str) -> Tuple[List[str], List[str], bool]:
    """(Hydra flags, overrides, multirun) of a verb's arguments, checked before Hydra sees them: group names, the
    override grammar, unknown keys, value types, and a writable ``paths.results`` when the job will write."""
    flags, overrides, multirun = split_args(argv)
    overrides = quote_non_ascii(overrides)
    # the preset group always has a default (none), so Hydra's append form means the same as choosing it
    overrides = [o[1:] if o.startswith("+protocol=") else o for o in overrides]
    validate_overrides(overrides)
    if any(f in ("--help", "-h", "--hydra-help") for f in flags):
        return flags, overrides, multirun
    cfg = check_overrides(config_name, [o for o in overrides if not o.startswith("cluster=")])
    if not prints_only(flags) and "paths" in cfg:
        check_results_dir(cfg.paths.results)
    return flags, overrides, multirun


def cmd_run(argv: List[str]) -> None:
    flags, overrides, multirun = prepare(argv, "config")
    _hydra_main(flags + overrides, multirun, "config", _run_job)


def cmd_train(argv: List[str]) -> None:
    flags, overrides, multirun = prepare(argv, "train")
    _hydra_main(flags + overrides, multirun, "train", _train_job)


def upsampler_licences() -> List[Tuple[str, str]]:
    """(name, licence) of every upsampler: the licence of the code its implementation follows and that of its
    official weights, where declared."""
    from .registry import UPSAMPLERS

    out = []
    for name in registered("upsampler"):
        cls = UPSAMPLERS.get(name)
        parts = [f"code {cls.licence}"] if getattr(cls, "licence", "") else []
        weights = sorted({cfg.licence for cfg in (getattr(cls, "pretrained_cfgs", None) or {}).values()})
        if weights:
            parts.append(f"weights {', '.join(weights)}")
        out.append((name, "; ".join(parts) or "not stated"))
    return out


def cmd_list(_: List[str]) -> None:
    for group in GROUPS[:-1]:
        print(f"{group}s: {', '.join(registered(group))}")
    print("upsampler licences (the code each implementation follows; official weights):")
    for name, licence in upsampler_licences():
        print(f"  {name:<15} {licence}")
    print(f"sweeps: {', '.join(config_options('sweep'))}")
    print(f"clusters (slurm/cluster/): {', '.join(config_options('cluster'))}")
    print("protocols (protocol=<name>, configs/protocol/):")
    for name, preset in protocol_presets().items():
        print(f"  {name:<15} {preset.get('description', '')}")


def protocol_presets() -> dict:
    """name -> the ``protocol`` section of every preset (name, description, tasks, sources, unstated)."""
    import yaml

    from .config import config_dir

    out = {}
    for name in config_options("protocol"):
        data = yaml.safe_load((config_dir() / "protocol" / f"{name}.yaml").read_text()) or {}
        if isinstance(data.get("protocol"), dict):
            out[name] = data["protocol"]
    return out


def cmd_demo(argv: List[str]) -> None:
    """Seg probe on the embedded demo set with the demo backbone, once per registered upsampler."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: upbench demo [key=value overrides]\n\n"
              "The offline demo (configs/demo.yaml): the segmentation probe on the embedded demo set for every "
              "upsampler,\nthe depth probe and step stability for a few, the quick scaling sweep, every figure and "
              "the HTML report\n(results/report/index.html).  Overrides apply to every job, e.g. "
              "upbench demo paths.results=/tmp/demo upsampler=bilinear,uplift")
        return
    from . import demo

    flags, overrides, multirun = split_args(argv)
    if flags or multirun:
        _fail(f"upbench demo takes key=value overrides only, not {(flags or ['-m'])[0]}")
    overrides = quote_non_ascii(overrides)
    validate_overrides(overrides)
    spec = demo.demo_spec()   # the demo's own settings come first, as in every demo job
    base = list(spec.get("overrides") or []) + list(spec.get("seg") or [])
    cfg = check_overrides("config", base + [o for o in overrides if not o.startswith("upsampler=")])
    check_results_dir(cfg.paths.results)
    demo.main(overrides)


def cmd_sweep(argv: List[str]) -> None:
    """``upbench sweep <name> [--quick] [overrides]``: a measurement sweep defined by configs/sweep/<name>.yaml;
    with ``hydra/launcher=slurm`` the whole sweep runs as one job (its points stay sequential: a point's size
    limit depends on the previous ones)."""
    sweeps = config_options("sweep")
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: upbench sweep <name> [--quick] [key=value overrides] [--cfg job|hydra|all] [--info]\n"
                  f"sweeps: {', '.join(sweeps)}")
            return
        _fail(f"which sweep? usage: upbench sweep <name> [--quick] [overrides]; sweeps: {', '.join(sweeps)}")
    name, rest = argv[0], argv[1:]
    if name not in sweeps:
        _fail(f"unknown sweep '{name}'; sweeps: {', '.join(sweeps)}")
    quick = "--quick" in rest
    rest = [a for a in rest if a != "--quick"]
    known = set(HYDRA_FLAGS) | {"-m", "--multirun"}
    unknown = [a for a in rest if a.startswith("-") and "=" not in a and a not in known]
    if unknown:
        _fail(f"unknown option {unknown[0]} for upbench sweep (options: --quick, -m, --cfg job|hydra|all, --resolve, "
              "--info, --help; the rest are key=value overrides)")
    flags, overrides, multirun = prepare(rest, f"sweep/{name}")
    if quick:
        overrides = [*_onto_quick_grid(name, overrides), "use_quick=true"]
    _hydra_main(flags + overrides, multirun, f"sweep/{name}", _sweep_job)


def _onto_quick_grid(name: str, overrides: List[str]) -> List[str]:
    """``--quick`` replaces the sweep's keys by its ``quick`` block; a key of that block set on the command line
    (``--quick sizes=[32]``) is meant for this run, so it goes into the block (``quick.sizes=[32]``)."""
    import yaml

    from .config import config_dir

    data = yaml.safe_load((config_dir() / "sweep" / f"{name}.yaml").read_text()) or {}
    keys = set(data.get("quick") or {})
    return [f"quick.{o}" if "=" in o and o.split("=", 1)[0].split(".")[0] in keys else o for o in overrides]


def cmd_status(argv: List[str]) -> None:
    """``upbench status [--sweep NAME|latest|all] [--results DIR]``: finished / running / failed jobs of a
    submitted sweep, with the log of each failure."""
    from . import jobs

    parser = ArgumentParser(prog="upbench status")
    parser.add_argument("--sweep", default="latest", help="a sweep name (see results/jobs/), latest or all")
    parser.add_argument("--results", default=os.environ.get("UPBENCH_RESULTS", "results"))
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    args = parser.parse_args(argv)
    if not jobs.sweep_records(args.results):   # nothing submitted yet is a state, not an error
        print(f"no submitted sweeps under {Path(args.results).resolve() / 'jobs'}; submit with "
              "`upbench run -m ... hydra/launcher=slurm` (or hydra/launcher=local)")
        return
    found = jobs.status(args.results, args.sweep)
    if args.json:
        import json

        for j in found:
            print(json.dumps(j, default=str))
    else:
        sys.stdout.write(jobs.format_status(found))


def read_rows(results: str, missing_ok: bool = False) -> List[dict]:
    """Every row of a results folder; a file that is not a row is skipped with one warning line naming it."""
    from .results import ResultStore

    root = Path(os.path.expanduser(str(results)))
    if root.exists() and not root.is_dir():
        _fail(f"--results {root} is a file, not a results folder")
    if not root.exists() and not missing_ok:
        _fail(f"no results folder {root.resolve()}; run a job first (upbench run ...) or pass --results DIR")
    return ResultStore(str(root)).rows(warn=lambda msg: print(f"upbench: warning: {msg}", file=sys.stderr))


def cmd_report(argv: List[str]) -> None:
    from . import report

    parser = ArgumentParser(prog="upbench report")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--latex", action="store_true", help="booktabs LaTeX (best bold, second underlined)")
    fmt.add_argument("--csv", action="store_true", help="CSV (with --scaling: one tidy line per sweep point)")
    parser.add_argument("--html", metavar="DIR", help="also write DIR/index.html: every table and figure, one page")
    parser.add_argument("--paper", action="store_true", help="add the published reference rows")
    parser.add_argument("--rank-paper", action="store_true", help="rank the published rows with ours (implies --paper)")
    parser.add_argument("--scaling", action="store_true", help="only the scaling sweep tables (upbench sweep scaling)")
    parser.add_argument("--plot", metavar="PNG", help="with --scaling: also write the time/memory figure here")
    parser.add_argument("--results", default=os.environ.get("UPBENCH_RESULTS", "results"))
    args = parser.parse_args(argv)
    if args.plot and not args.scaling:
        _fail("--plot needs --scaling")
    rows = read_rows(args.results)
    kind = "latex" if args.latex else "csv" if args.csv else "markdown"
    sys.stdout.write(report.render(rows, kind, paper=args.paper or args.rank_paper, scaling=args.scaling,
                                   rank_paper=args.rank_paper))
    if args.plot:
        from .viz import rows as figures

        paths = figures.scaling(rows, Path(args.plot).parent)
        print(f"figure: {paths[0]}" if paths else "no scaling rows to plot", file=sys.stderr)
    if args.html:
        from .report.html import write_report

        print(f"report: {write_report(args.results, args.html, paper=args.paper)}", file=sys.stderr)


def cmd_viz(argv: List[str]) -> None:
    """``upbench viz <kind> [--results DIR] [--out DIR] [--upsamplers a,b] [--image N] [--log FILE] [overrides]``."""
    from . import viz

    parser = ArgumentParser(prog="upbench viz", description=viz.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=viz.KINDS)
    parser.add_argument("--results", default=os.environ.get("UPBENCH_RESULTS", "results"))
    parser.add_argument("--out", help="folder for the PNG + PDF files (default: <results>/figures)")
    parser.add_argument("--upsamplers", help="pca / steps: comma-separated upsamplers (default: all)")
    parser.add_argument("--image", type=int, default=0, help="pca / steps: index of the validation image")
    parser.add_argument("--log", action="append", default=[], help="train: a training log (<weights>.log.json)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        _fail(f"unknown option {bad[0]} for upbench viz (options: --results --out --upsamplers --image --log; the rest "
              f"are key=value overrides)")
    validate_overrides(overrides)
    rows = read_rows(args.results, missing_ok=True)
    out = Path(args.out or Path(args.results) / "figures")
    paths = viz.main_kind(args.kind, rows, Path(args.results), out, overrides,
                          upsamplers=args.upsamplers.split(",") if args.upsamplers else None, image=args.image,
                          logs=[Path(p) for p in args.log])
    if not paths:
        _fail(f"nothing to draw for '{args.kind}' in {Path(args.results).resolve()}: "
              + {"scaling": "no sweep rows (upbench sweep scaling)",
                 "perclass": "no two methods with per-class IoU on one seg table (upbench run task=seg ...)",
                 "predictions": "no seg / depth rows with a saved probe (upbench run task=seg ...)",
                 "train": "no training logs under <results>/train (upbench train ..., or --log FILE)"}.get(args.kind, ""))
    for p in paths:
        print(p)


COMMANDS = {"run": cmd_run, "train": cmd_train, "demo": cmd_demo, "list": cmd_list, "sweep": cmd_sweep,
            "report": cmd_report, "viz": cmd_viz, "status": cmd_status}


#: OpenMP threads sleep while they wait instead of spinning (libgomp spins by default): on a shared CPU a spinning
#: thread burns the time slice its partner needs, and UPLiFT's thousands of small ops each wait once.  Measured with
#: benchmarks/loaded_cpu.py (README, "Shared CPUs").  Set before torch loads OpenMP; a user's own value wins.
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: Optional[List[str]] = None) -> None:
    for key, value in OMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        return
    if argv[0] == "--version":
        from . import __version__

        print(f"upbench {__version__}")
        return
    if argv[0] in ("--shell-completion", "-sc"):
        from . import completion

        try:
            sys.stdout.write(completion.script(argv[1:]))
        except UpbenchError as exc:
            _fail(str(exc))
        return
    if argv[0] == "__complete":   # called by the shell completion script
        from . import completion

        print("\n".join(completion.candidates(argv[1:])))
        return
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        _fail(f"unknown command '{verb}'; commands: {', '.join(COMMANDS)} (upbench --help)")
    try:
        COMMANDS[verb](rest)
    except SystemExit:
        raise
    except BaseException as exc:   # noqa: BLE001  (every error ends as one line)
        report_exception(exc)


if __name__ == "__main__":
    main()
