"""Every figure kind, from tiny real runs: the feature PCA, the iterative steps, predictions from saved probes,
per-class IoU bars, training-loss curves (the scaling figure is in test_scaling); and ``upbench viz`` on the CLI."""
from pathlib import Path

import pytest
import torch

from upbench import viz
from upbench.config import compose, to_container
from upbench.results import ResultStore
from upbench.runner import run_job

TINY = ["backbone=demo", "dataset.img_size=64", "dataset.num_images=4", "dataset.limit_val=2",
        "upsampler.weights=null", "task.probe.epochs=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = tmp_path_factory.mktemp("viz") / "results"
    rows = []
    for up in ("bilinear", "uplift"):
        rows.append(run_job(to_container(compose(["task=seg", "dataset=demo", f"upsampler={up}", *TINY,
                                                   f"paths.results={results}"])), log=lambda *_: None))
    rows.append(run_job(to_container(compose(["task=depth", "dataset=demo_depth", "upsampler=bilinear", *TINY,
                                               "task.probe.cls_token=false", f"paths.results={results}"])),
                        log=lambda *_: None))
    return results, rows


def _pngs(paths):
    pngs = [Path(p) for p in paths if p.endswith(".png")]
    assert pngs and all(p.stat().st_size > 5_000 for p in pngs), paths
    assert all(Path(p).with_suffix(".pdf").is_file() for p in pngs)
    return pngs


def test_rows_carry_per_class_iou_class_names_and_the_probe(runs):
    results, rows = runs
    seg = rows[0]
    names = seg["data"]["class_names"]
    assert names == ["grass", "gravel", "brick", "fur", "coffee", "stars"]
    ious = seg["metrics"]["per_class_iou"]
    assert len(ious) == 6 and all(v is None or 0 <= v <= 100 for v in ious)
    assert all((v is None) == (n == 0) for v, n in zip(ious, seg["data"]["val_pixels_per_class"]))
    probe = results / seg["artefacts"]["probe"]
    assert probe.is_file() and probe.stat().st_size < 10_000
    assert rows[2]["artefacts"]["probe"] and (results / rows[2]["artefacts"]["probe"]).is_file()
    assert seg["timing"]["load_start"] is not None and "git_sha" in seg["versions"]


def test_every_figure_kind(runs, tmp_path):
    results, rows = runs
    stored = ResultStore(str(results)).rows()
    out = tmp_path / "figures"
    _pngs(viz.main_kind("pca", stored, results, out, TINY + ["task=seg", "dataset=demo"],
                        upsamplers=["bilinear", "uplift"]))
    _pngs(viz.main_kind("steps", stored, results, out, TINY + ["task=seg", "dataset=demo"],
                        upsamplers=["bilinear", "uplift"]))
    preds = _pngs(viz.main_kind("predictions", stored, results, out))
    assert {p.name for p in preds} == {"predictions_seg_demo.png", "predictions_depth_demo_depth.png"}
    _pngs(viz.main_kind("perclass", stored, results, out))
    log = Path(__file__).resolve().parents[1] / "upbench" / "assets" / "uplift_demo.log.json"
    _pngs(viz.main_kind("train", stored, results, out, logs=[log]))


def test_joint_pca_uses_one_colour_scale_for_every_map():
    from upbench.plotting import JointPCA

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 6, 6, generator=g)
    b = a * 3.0                                    # the same directions, three times as far out
    pca = JointPCA([a, b], k=3)
    ra, rb = pca.rgb(a), pca.rgb(b)
    assert ra.shape == (6, 6, 3) and 0 <= ra.min() and rb.max() <= 1
    assert (abs(rb - 0.5)).mean() > (abs(ra - 0.5)).mean()   # b is further from the centre on the shared scale


def test_viz_cli_says_what_is_missing(cli, tmp_path):
    out = cli(["viz", "perclass", "--results", str(tmp_path / "empty")])
    assert out.returncode == 2 and "nothing to draw for 'perclass'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    bad = cli(["viz", "pca", "--frobnicate"])
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr
