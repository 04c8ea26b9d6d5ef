"""Shell completion for ``upbench``: verbs, config groups and their options (``task=<TAB>``), config keys
(``task.probe.<TAB>``), launchers, sweeps, and each verb's options.

``upbench --shell-completion install=bash`` prints a script to source (``eval "$(upbench --shell-completion
install=bash)"`` in ``~/.bashrc``); ``zsh`` uses the same script through ``bashcompinit``; ``fish`` gets its own.
The script calls ``upbench __complete "<line up to the cursor>"``, which prints one candidate per line."""
from __future__ import annotations

import os
import shlex
import sys
from typing import Iterable, List, Sequence

from .errors import UpbenchError

VERBS = ("run", "train", "sweep", "demo", "report", "viz", "status", "list")
HYDRA_VERBS = {"run": "config", "train": "train", "demo": "config"}
HYDRA_OPTIONS = ("-m", "--multirun", "--cfg", "--resolve", "--info", "--help", "--hydra-help", "--package")
VERB_OPTIONS = {"report": ("--latex", "--csv", "--html", "--paper", "--rank-paper", "--scaling", "--plot",
                           "--results"),
                "viz": ("--results", "--out", "--upsamplers", "--image", "--log"),
                "status": ("--sweep", "--results", "--json"), "list": (), "sweep": ("--quick",)}
LAUNCHERS = ("slurm", "local", "basic")
CFG_CHOICES = ("job", "hydra", "all")

BASH = r'''# upbench shell completion (bash); load it with: eval "$(upbench --shell-completion install=bash)"
_upbench_complete() {
    local line="${COMP_LINE:0:COMP_POINT}"
    local cur="${line##* }"
    local IFS=$'\n'
    local candidates=( $(%(cmd)s __complete "$line" 2>/dev/null) )
    # bash splits words at '=' and ':' (COMP_WORDBREAKS): offer only what follows the last of them
    local strip="${cur%%"${cur##*[=:]}"}"
    COMPREPLY=()
    local c
    for c in "${candidates[@]}"; do
        COMPREPLY+=( "${c#"$strip"}" )
    done
    if [[ ${#COMPREPLY[@]} -eq 1 && "${COMPREPLY[0]}" == *[=.] ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}
complete -F _upbench_complete upbench
'''
ZSH = "# upbench shell completion (zsh)\nautoload -U +X bashcompinit && bashcompinit\n" + BASH
FISH = '''# upbench shell completion (fish); load it with: upbench --shell-completion install=fish | source
complete -c upbench -f -a '(%(cmd)s __complete (commandline -cp))'
'''


def _command() -> str:
    """How the completion script calls upbench: the same executable that wrote it."""
    exe = sys.argv[0] if sys.argv and sys.argv[0] else "upbench"
    if exe.endswith("__main__.py") or not os.path.basename(exe).startswith("upbench"):
        return f"{shlex.quote(sys.executable)} -m upbench"
    return shlex.quote(os.path.abspath(exe)) if os.path.sep in exe else exe


def script(args: Sequence[str]) -> str:
    """The completion script for ``install=<shell>`` (bash, zsh, fish)."""
    shells = {"bash": BASH, "zsh": ZSH, "fish": FISH}
    spec = args[0] if args else ""
    action, _, shell = spec.partition("=")
    if action != "install" or shell not in shells:
        raise UpbenchError(f"--shell-completion takes install=<shell> with shell one of {', '.join(shells)} "
                           "(e.g. eval \"$(upbench --shell-completion install=bash)\")")
    return shells[shell] % {"cmd": _command()}


def _match(prefix: str, options: Iterable[str]) -> List[str]:
    return sorted({o for o in options if o.startswith(prefix)})


def _group_options(group: str) -> List[str]:
    from .config import config_options

    if group == "hydra/launcher":
        return list(LAUNCHERS)
    return config_options(group)


def _groups() -> List[str]:
    from .overrides import _group_names

    return [g for g in _group_names() if g not in ("protocol_task", "sweep", "hydra")] + ["hydra/launcher"]


def _keys(config_name: str, typed: Sequence[str], prefix: str) -> List[str]:
    """Config keys under the typed prefix (``task.probe.`` -> ``task.probe.lr=``, ...) of the config the line's
    group choices compose."""
    from omegaconf import DictConfig, OmegaConf

    from .config import compose

    groups = set(_groups())
    chosen = [w for w in typed if "=" in w and w.split("=", 1)[0] in groups and "," not in w]
    try:
        cfg = compose(chosen, config_name=config_name)
    except Exception:   # noqa: BLE001  (an unfinished line may not compose; then no key candidates)
        return []
    parent, _, _ = prefix.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    out = []
    for k in node.keys():
        full = f"{parent}.{k}" if parent else str(k)
        if parent == "" and full in groups:
            continue
        out.append(full + ("." if isinstance(node.get(k), DictConfig) else "="))
    return _match(prefix, out)


def candidates(args: Sequence[str]) -> List[str]:
    """Completions of the line (up to the cursor) in ``args[0]``."""
    line = args[0] if args else ""
    words = line.split()
    cur = "" if not words or line.endswith(" ") else words[-1]
    done = words[1:] if cur == "" else words[1:-1]   # words[0] is the program
    if not done:
        return _match(cur, VERBS + ("--help", "--version", "--shell-completion"))
    verb, rest = done[0], done[1:]
    if verb == "sweep" and not rest:
        from .config import config_options

        return _match(cur, config_options("sweep"))
    if verb == "viz" and not [w for w in rest if not w.startswith("-")]:
        from .viz import KINDS

        return _match(cur, list(KINDS) + list(VERB_OPTIONS["viz"]))
    if rest and rest[-1] in ("--cfg", "-c"):
        return _match(cur, CFG_CHOICES)
    if verb in ("report", "status", "list") or (verb == "viz" and cur.startswith("-")):
        return _match(cur, VERB_OPTIONS.get(verb, ()))
    if verb not in HYDRA_VERBS and verb != "sweep" and verb != "viz":
        return []
    if cur.startswith("-"):
        return _match(cur, HYDRA_OPTIONS + VERB_OPTIONS.get(verb, ()))
    config_name = f"sweep/{rest[0]}" if verb == "sweep" and rest else HYDRA_VERBS.get(verb, "config")
    groups = _groups()
    if "=" in cur:
        key, _, value = cur.partition("=")
        bare = key.lstrip("+~")
        if bare in groups:
            head, _, last = value.rpartition(",")   # a multirun list: complete its last element
            lead = f"{key}={head + ',' if head else ''}"
            return [lead + o for o in _match(last, _group_options(bare))]
        if value == "" or value in ("t", "tr", "tru", "f", "fa", "fal", "fals"):
            return [f"{key}={v}" for v in _match(value, ("true", "false"))] if _is_bool(config_name, rest, bare) \
                else []
        return []
    if "." in cur:
        return _keys(config_name, rest, cur)
    return _match(cur, [g + "=" for g in groups if not (verb == "sweep" and g not in ("backbone", "hydra/launcher"))]
                  + _keys(config_name, rest, cur))


def _is_bool(config_name: str, typed: Sequence[str], key: str) -> bool:
    from omegaconf import OmegaConf

    from .config import compose

    try:
        return isinstance(OmegaConf.select(compose([w for w in typed if "=" in w and "," not in w],
                                                   config_name=config_name), key), bool)
    except Exception:   # noqa: BLE001
        return False
