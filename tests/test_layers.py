"""The layering the core is built on, checked by parsing every import (module-level and function-local):

  L3  upbench.cli, completion, __main__, hydra_plugins.upbench_launcher   (thin; import lazily)
  L2  upbench.pipeline, runner, scaling, demo, report, jobs, viz      (reach plugins only through registries)
  L1  upbench.upsamplers / tasks / backbones / data                   (plugins; import L0 and their own family)
  L0  everything else in upbench: errors, registry, protocols, schema, results, files, cache, ...

Imports only go down; no plugin family imports another; no module of ours imports a plugin module by name from
outside its family; nothing imports the old top-level names (tasks, upsamplers, configs, slurm); no import cycles."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"upbench": ROOT / "upbench", "upbench.upsamplers": ROOT / "upsamplers", "upbench.tasks": ROOT / "tasks",
           "hydra_plugins.upbench_launcher": ROOT / "hydra_plugins" / "upbench_launcher"}
L3 = ("upbench.cli", "upbench.completion", "upbench.__main__", "hydra_plugins.upbench_launcher")
L2 = ("upbench.pipeline", "upbench.runner", "upbench.scaling", "upbench.demo", "upbench.report", "upbench.jobs",
      "upbench.viz")
L1 = ("upbench.upsamplers", "upbench.tasks", "upbench.backbones", "upbench.data")
OLD_TOP_LEVEL = {"tasks", "upsamplers", "configs", "slurm"}


def _modules():
    mods = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((package,) + rel)
            if package == "upbench" and any(name.startswith(p + ".") or name == p for p in
                                            ("upbench.upsamplers", "upbench.tasks")):
                continue
            mods[name] = path
    return mods


MODULES = _modules()


def _is_package(name):
    return MODULES.get(name, Path()).name == "__init__.py"


def _within(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def layer(name):
    if any(_within(name, p) for p in L3):
        return 3
    if any(_within(name, p) for p in L2):
        return 2
    if any(_within(name, p) for p in L1):
        return 1
    return 0


def family(name):
    return next((p for p in L1 if _within(name, p)), None)


def imports(name):
    """(imported module, line) for every import statement in module ``name`` that targets our own modules, or an
    old top-level name."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in OLD_TOP_LEVEL:
                out.append((t, node.lineno))
                continue
            while t and t not in MODULES:   # `import upbench.x.y` names the deepest module of ours that exists
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno))
    return out


def test_the_module_map_covers_the_core_and_every_plugin_family():
    assert {"upbench.cli", "upbench.pipeline", "upbench.registry", "upbench.upsamplers.uplift", "upbench.tasks.seg",
            "upbench.backbones.vae", "upbench.data.voc", "hydra_plugins.upbench_launcher.launcher"} <= set(MODULES)
    assert layer("upbench.registry") == 0 and layer("upbench.tasks.seg") == 1 and layer("upbench.runner") == 2


def test_imports_only_go_down_and_plugins_stay_in_their_family():
    problems = []
    for name in sorted(MODULES):
        for target, line in imports(name):
            where = f"{MODULES[name].relative_to(ROOT)}:{line} ({name} -> {target})"
            if target.split(".")[0] in OLD_TOP_LEVEL:
                problems.append(f"{where}: old top-level package")
            elif layer(target) > layer(name):
                problems.append(f"{where}: L{layer(name)} imports L{layer(target)}")
            elif layer(target) == 1 and family(target) != family(name):
                problems.append(f"{where}: imports plugin family {family(target)} by name")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {name: sorted({t for t, _ in imports(name)}) for name in MODULES}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("code,absent", [
    ("import upbench", ["torch"]),
    ("import upbench.cli", ["torch", "hydra"]),
    ("import hydra_plugins.upbench_launcher.launcher", ["torch", "submitit", "upbench.results", "numpy"]),
])
def test_light_imports_stay_light(code, absent):
    """Hydra imports every hydra_plugins module when any Hydra app starts; ``upbench --help`` answers at once."""
    probe = f"import sys; {code}; print(','.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{code} imported {out.stdout.strip()}"
