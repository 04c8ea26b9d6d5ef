"""``upbench <verb> [hydra overrides]`` -- a thin layer: parse the verb, compose the config, call one function.

  upbench run task=seg upsampler=uplift dataset=voc backbone=dinov2_s14 [-m for multirun]
  upbench demo                      # seg on the embedded demo set for every registered upsampler
  upbench list                      # upsamplers, tasks, backbones, datasets
  upbench report [--latex|--csv] [--paper] [--results DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import upbench  # noqa: F401  (torchvision fallback first)
from .errors import UpbenchError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("task", "upsampler", "backbone", "dataset")


def _fail(msg: str) -> "NoReturn":  # noqa: F821
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


def _hydra_main(overrides: List[str], multirun: bool) -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base=None, config_path="pkg://configs", config_name="config")
    def _entry(cfg: DictConfig) -> None:
        from .runner import run_job

        try:
            run_job(cfg)
        except UpbenchError as exc:
            _fail(str(exc))

    sys.argv = ["upbench"] + (["-m"] if multirun else []) + overrides
    _entry()


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="configs", version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def cmd_run(argv: List[str]) -> None:
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    validate_overrides(overrides)
    _hydra_main(overrides, multirun)


def cmd_list(_: List[str]) -> None:
    for group in GROUPS:
        print(f"{group}s: {', '.join(registered(group))}")


def demo_spec() -> Dict[str, object]:
    from omegaconf import OmegaConf

    import configs

    return OmegaConf.to_container(OmegaConf.load(Path(configs.__file__).parent / "demo.yaml"))  # type: ignore


def cmd_demo(argv: List[str]) -> None:
    """Seg probe on the embedded demo set with the demo backbone, once per registered upsampler."""
    import time

    from omegaconf import OmegaConf

    from . import report
    from .results import ResultStore
    from .runner import run_job

    validate_overrides(argv)
    spec = demo_spec()
    chosen = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("upsampler=")]
    names = chosen[0] if chosen else [n for n in registered("upsampler") if n in config_options("upsampler")]
    rest = [a for a in argv if not a.startswith("upsampler=")]
    t0 = time.perf_counter()
    keys, results_dir = [], None
    for name in names:
        extra = list((spec.get("upsampler_overrides") or {}).get(name, []))
        cfg = compose([f"upsampler={name}"] + list(spec["overrides"]) + extra + rest)
        results_dir = OmegaConf.to_container(cfg, resolve=True)["paths"]["results"]
        keys.append(run_job(cfg)["config_hash"])
    shown = [r for r in ResultStore(results_dir).rows() if r["config_hash"] in set(keys)] if results_dir else []
    print()
    print(report.render(shown, "markdown"))
    print(f"demo wall time: {time.perf_counter() - t0:.1f} s (results in {Path(results_dir or '.').resolve()})")


def cmd_report(argv: List[str]) -> None:
    from . import report
    from .results import ResultStore

    parser = argparse.ArgumentParser(prog="upbench report")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--latex", action="store_true", help="booktabs LaTeX (best bold, second underlined)")
    fmt.add_argument("--csv", action="store_true")
    parser.add_argument("--paper", action="store_true", help="add the published reference rows")
    parser.add_argument("--results", default=os.environ.get("UPBENCH_RESULTS", "results"))
    args = parser.parse_args(argv)
    rows = ResultStore(args.results).rows()
    kind = "latex" if args.latex else "csv" if args.csv else "markdown"
    sys.stdout.write(report.render(rows, kind, paper=args.paper))


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "list": cmd_list, "report": cmd_report}


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
