"""``upbench demo`` end to end (two methods, tiny sizes): the probes, the stability run, the quick sweep, every
figure kind and the HTML report; UPLiFT always runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upbench.results import ResultStore

pytestmark = pytest.mark.slow


def test_demo_runs_everything_and_writes_the_report(tmp_path):
    env = {**os.environ, "UPBENCH_RESULTS": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "upbench", "demo", "upsampler=bilinear,uplift", "dataset.img_size=64",
                          "dataset.num_images=4", "dataset.limit_val=2", "task.probe.epochs=1", "threads=1"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = ResultStore(str(tmp_path / "results")).rows()
    done = {(r["task"], r["upsampler"]) for r in rows if r["status"] == "ok"}
    assert {("seg", "bilinear"), ("seg", "uplift"), ("depth", "bilinear"), ("depth", "uplift"),
            ("stability", "uplift")} <= done
    assert {r["upsampler"] for r in rows if r["task"] == "scaling"} == {"bilinear", "uplift"}
    figures = {p.name.split("_")[0] for p in (tmp_path / "results").rglob("*.png")}
    assert {"pca", "steps", "train", "predictions", "per", "scaling"} <= figures, figures
    page = Path(out.stdout.strip().splitlines()[-1].split("report: ", 1)[1].split()[0])
    assert page.is_file() and page.parent == tmp_path / "results" / "report"
    text = page.read_text()
    assert "Segmentation linear probes" in text and "Depth linear probes" in text and "Scaling summary" in text
    assert text.count("<img ") >= 6
