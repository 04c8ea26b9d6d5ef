"""Command-line arguments checked before Hydra runs, so that a mistake costs one line and exit code 2 instead of a
stack trace half-way through a job: Hydra's own flags told apart from overrides, unquoted non-ASCII paths quoted,
the override grammar, unknown keys (with the keys that do exist), and every value's type against its default
(``task.probe.epochs=abc``), for every value of a multirun sweep."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .errors import UpbenchError

#: Hydra's command-line flags and how many arguments each takes (``--info`` takes an optional one)
HYDRA_FLAGS = {"--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--resolve": 0, "--help": 0, "-h": 0,
               "--hydra-help": 0, "--info": "?", "-i": "?", "--config-path": 1, "-cp": 1, "--config-name": 1,
               "-cn": 1, "--config-dir": 1, "-cd": 1, "--experimental-rerun": 1}
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
#: flags after which Hydra only prints (nothing runs, nothing is written)
PRINT_ONLY = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i")
#: characters that make a value part of Hydra's grammar (sweeps, lists, interpolations, quotes)
GRAMMAR = set(",[]{}()$'\"=")


def split_args(argv: Sequence[str]) -> Tuple[List[str], List[str], bool]:
    """(Hydra flags with their arguments, overrides, multirun) of a verb's arguments."""
    flags: List[str] = []
    overrides: List[str] = []
    multirun = False
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in HYDRA_FLAGS:
            n = HYDRA_FLAGS[a]
            take = 1 if n == "?" and i + 1 < len(argv) and argv[i + 1] in INFO_CHOICES else (n if n != "?" else 0)
            flags += argv[i:i + 1 + int(take)]
            i += int(take)
        elif a.startswith("-") and "=" not in a:
            raise UpbenchError(f"unknown option {a}; options: -m/--multirun, --cfg job|hydra|all, --resolve, --info, "
                               "--help, --hydra-help, --package; the rest are key=value overrides")
        else:
            overrides.append(a)
        i += 1
    return flags, overrides, multirun


def prints_only(flags: Sequence[str]) -> bool:
    return any(f in PRINT_ONLY for f in flags)


def quote_non_ascii(overrides: Sequence[str]) -> List[str]:
    """``dataset.root=/data/données`` -> ``dataset.root='/data/données'``: Hydra's grammar takes non-ASCII text only
    quoted; a value with no grammar characters in it can only have meant the plain string."""
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if sep and not value.isascii() and not (set(value) & GRAMMAR):
            value = f"'{value}'"
        out.append(f"{key}{sep}{value}")
    return out


def _parse(overrides: Sequence[str]) -> List[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for ov in overrides:
        try:
            parsed.append(parser.parse_override(ov))
        except HydraException as exc:
            detail = (str(exc).strip().splitlines() or [""])[0]
            if "=" not in ov:
                raise UpbenchError(f"'{ov}' is not an override: write key=value (e.g. upsampler={ov} or "
                                   f"task.probe.epochs=5)") from None
            key = ov.split("=", 1)[0]
            raise UpbenchError(f"cannot parse the override {ov} ({detail}); quote a value with special characters, "
                               f"e.g. \"{key}='...'\" (the shell needs the outer quotes)") from None
    return parsed


def _values(o: Any) -> Optional[List[Any]]:
    """Every value an override sets (the choices of a sweep); None for an interval (a sweeper picks the values)."""
    if not o.is_sweep_override():
        return [o.value()]
    try:
        return list(o.sweep_iterator())
    except Exception:   # noqa: BLE001  (interval / glob sweeps are for sweepers and groups)
        return None


def _first_override(o: Any) -> Optional[str]:
    """An override that sets one of ``o``'s values, for composing a config to check keys against."""
    if not o.is_sweep_override():
        return o.input_line
    try:
        first = next(iter(o.sweep_string_iterator()))
    except Exception:   # noqa: BLE001
        return None
    return f"{o.get_key_element()}={first}"


def _kind(default: Any) -> Optional[str]:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, (list, tuple)):
        return "a list like [a,b]"
    return None


def _fits(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def _compose(config_name: str, overrides: Sequence[str]):
    from .config import compose

    return compose(list(overrides), config_name=config_name)


def _composition_error(exc: Exception, ov: Optional[str], base: Any) -> UpbenchError:
    """One line for Hydra's / OmegaConf's composition errors, naming the override and what would be valid."""
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    ctext = " ".join(str(cause).split()) if cause else ""
    if ov and ("not in struct" in text + ctext or "Could not override" in text or "Could not append" in text):
        key = ov.lstrip("+~").split("=", 1)[0]
        parent, _, leaf = key.rpartition(".")
        known = _keys_at(base, parent)
        hint = f"; keys of {parent or 'the config'}: {', '.join(known)}" if known else ""
        if "Could not append" in text:
            return UpbenchError(f"{key} is already in the config: set it with {key}=... (without '+')")
        renamed = _renamed(base, parent, leaf)
        if renamed:
            value = ov.split("=", 1)[-1]
            return UpbenchError(f"{key} is now called {parent}.{renamed}: write {parent}.{renamed}={value}")
        return UpbenchError(f"unknown config key '{key}' in {ov}{hint} (a new key needs +{ov})")
    first = text.split(" Set the environment variable HYDRA_FULL_ERROR")[0]
    return UpbenchError(f"{('in ' + ov + ': ') if ov else ''}{first}" + (f" ({ctext})" if ctext and ctext not in first
                                                                          else ""))


def _renamed(base: Any, parent: str, leaf: str) -> Optional[str]:
    """The new name of an upsampler constructor argument that was renamed (``upsampler.kwargs.<old>``)."""
    if parent != "upsampler.kwargs" or base is None:
        return None
    from .registry import UPSAMPLERS

    try:
        cls = UPSAMPLERS.get(str(base.upsampler.name))
    except Exception:   # noqa: BLE001  (an unknown name is reported elsewhere)
        return None
    return (getattr(cls, "renamed_arguments", None) or {}).get(leaf)


def _keys_at(cfg: Any, dotted: str) -> List[str]:
    from omegaconf import DictConfig, OmegaConf

    if cfg is None:
        return []
    node = OmegaConf.select(cfg, dotted) if dotted else cfg
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def check(config_name: str, overrides: Sequence[str]) -> Any:
    """Parse, compose (first value of each sweep) and type-check ``overrides`` against config ``config_name``;
    raise :class:`UpbenchError` with one line naming the first bad one.  Returns the composed config."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    errors = (HydraException, OmegaConfBaseException)
    own = [o for o in _parse(overrides) if not o.key_or_group.startswith("hydra")]
    group_names = set(_group_names())
    groups = [line for line in (_first_override(o) for o in own if o.key_or_group in group_names) if line]
    try:
        base = _compose(config_name, groups)
    except errors as exc:
        raise _composition_error(exc, None, None) from None
    chosen = [line for line in (_first_override(o) for o in own) if line]
    try:
        cfg = _compose(config_name, chosen)
    except errors as exc:   # find the override that breaks it, to name it
        for o in own:
            line = _first_override(o)
            if line is None or o.key_or_group in group_names:
                continue
            try:
                _compose(config_name, groups + [line])
            except errors as one:
                raise _composition_error(one, o.input_line, base) from None
        raise _composition_error(exc, None, base) from None
    for o in own:
        if o.is_delete() or o.is_add() or o.key_or_group in group_names:
            continue
        default = OmegaConf.select(base, o.key_or_group, throw_on_missing=False)
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        kind = _kind(default)
        values = _values(o)
        if kind is None or values is None:
            continue
        for v in values:
            if not _fits(default, v):
                raise UpbenchError(f"{o.key_or_group}={_show(v)}: expected {kind} (the default is "
                                   f"{_show(default)}); e.g. {o.key_or_group}={_show(default)}")
    return cfg


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return str(v)


def _group_names() -> Tuple[str, ...]:
    """The config groups a ``name=option`` override picks from (``cluster`` lives in the SLURM package)."""
    from .config import config_dir

    return tuple(p.name for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith(("_", "."))) + (
        "cluster",)


def check_results_dir(path: Any) -> Path:
    """``paths.results`` must be a folder this process can write (created if missing); one line otherwise."""
    root = Path(os.path.expanduser(str(path)))
    try:
        if root.exists() and not root.is_dir():
            raise UpbenchError(f"paths.results={root} is a file, not a folder; set paths.results (or UPBENCH_RESULTS) "
                               "to a folder")
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".upbench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UpbenchError(f"cannot write to paths.results={root} ({exc.strerror or type(exc).__name__}); set "
                           "paths.results (or UPBENCH_RESULTS) to a writable folder") from None
    return root

