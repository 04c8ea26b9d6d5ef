import math
import os
from pathlib import Path

import pytest

# the test files run in parallel workers (pyproject's addopts): OpenMP threads that spin while they wait would
# starve the other worker on a small machine, as on any shared CPU (the CLI asks for the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting, which torch reads when it loads)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UPBENCH_SHARED_DIR", ROOT.parent / "shared"))
ASSETS = SHARED / "assets"
GOLDEN = Path(os.environ.get("UPBENCH_GOLDEN_DIR", SHARED / "golden"))


def need(path: Path) -> Path:
    """Skip (with the reason) when a shared asset is absent."""
    if not path.exists():
        pytest.skip(f"shared asset not available: {path}")
    return path


@pytest.fixture
def assets() -> Path:
    return need(ASSETS)

# Never wait for hub retries in tests: offline failures must be immediate.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The real TAEF2 weights are among the shared assets (subprocesses inherit this).
os.environ.setdefault("UPBENCH_TAEF2_DIR", str(ASSETS / "weights"))


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    path = tmp_path / "results"
    monkeypatch.setenv("UPBENCH_RESULTS", str(path))
    return path


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fan-in scaled random weights and BN statistics, so that softmaxes are neither uniform nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif t.dim() > 1:
                fan_in = t[0].numel() if "up.weight" not in name else t.shape[0] * t[0, 0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            elif "conv.1" in name or "conv.4" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(t.shape, generator=g) * 0.2)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """``upbench <args>`` in this process (``upbench.cli:main``, the console script's entry point): for checks of what
    a command prints and its exit code that do not need a process of their own.  Returns returncode / stdout /
    stderr like ``subprocess.run``."""
    from types import SimpleNamespace

    from upbench.cli import main

    def run(args, results=None):
        monkeypatch.setenv("UPBENCH_RESULTS", str(results or tmp_path / "results"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run
