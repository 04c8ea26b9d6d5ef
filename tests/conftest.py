import os
from pathlib import Path

import pytest

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


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    path = tmp_path / "results"
    monkeypatch.setenv("UPBENCH_RESULTS", str(path))
    return path
