"""Every ```python block of README.md runs as written: offline, each in a new process, in a temporary folder.

One substitution: the README loads torch.hub entries with ``torch.hub.load(".", ..., source="local")`` (run from a
checkout); here "." becomes this checkout's path, because the blocks run in a temporary folder.
Blocks that write a plugin (first line ``# upsamplers/<name>.py`` or ``# tasks/<name>.py``) run as that module of
the installed package (``upbench.upsamplers.<name>``, so ``from . import register`` works), in their own process,
so their registrations reach no other test; the upsampler one is then built and called."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)
PLUGIN = re.compile(r"#\s*(upsamplers|tasks)/(\w+)\.py")

AS_MODULE = """
import sys, types
package, name, code = {package!r}, {name!r}, {code!r}
module = types.ModuleType(f"{{package}}.{{name}}")
module.__package__ = package
sys.modules[module.__name__] = module
exec(compile(code, "README.md", "exec"), module.__dict__)
"""

CHECK_UPSAMPLER = """
import torch
from upbench import upsamplers
model = upsamplers.create({name!r}, in_channels=8, patch_size=14).eval()
with torch.no_grad():
    y = model(torch.randn(2, 3, 30, 40), torch.randn(2, 8, 3, 4), (17, 23))
assert y.shape == (2, 8, 17, 23), y.shape
"""

CHECK_TASK = """
from upbench.registry import TASKS
assert TASKS.get({name!r}).registry_name == {name!r}
"""


def script(code: str) -> str:
    plugin = PLUGIN.match(code.splitlines()[0]) if code.strip() else None
    if plugin is None:
        return code.replace('torch.hub.load(".",', f"torch.hub.load({str(ROOT)!r},")
    family, name = plugin.groups()
    check = CHECK_UPSAMPLER if family == "upsamplers" else CHECK_TASK
    return AS_MODULE.format(package=f"upbench.{family}", name=name, code=code) + check.format(name=name)


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(BLOCKS) >= 6
    assert any('torch.hub.load(".",' in b for b in BLOCKS) and any("save_pretrained" in b for b in BLOCKS)
    assert {PLUGIN.match(b.splitlines()[0]).group(1) for b in BLOCKS if PLUGIN.match(b.splitlines()[0])} == \
        {"upsamplers", "tasks"}


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script(code)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
