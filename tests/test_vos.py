"""task=vos: the official J / F on cases worked out by hand (empty masks, void pixels, border, tolerance, statistics,
aggregation over objects), the tiled propagation against a dense one written from VOS.md section 5, the DAVIS
layout and its errors, the presets, and end to end on davis_mini through the command line (a row per upsampler, the
saved label maps re-scored to the row's numbers, a finer upsampler ahead of low-res features, the report)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS, need
from upbench.config import compose, to_container
from upbench.errors import RunFailed, UpbenchError
from upbench.registry import DATASETS
from upbench.tasks import _vos_metrics as M
from upbench.tasks import _vos_propagation as P

DAVIS_MINI = ASSETS / "data" / "davis_mini"


# ------------------------------------------------------------------------------------------------ J and F by hand
def test_j_empty_void_and_plain_ratio():
    a = np.zeros((4, 4), bool)
    assert M.db_eval_iou(a, a) == 1.0                               # both empty: perfect
    b = a.copy()
    b[0, 0] = True
    assert M.db_eval_iou(a, b) == 0.0 and M.db_eval_iou(b, a) == 0.0
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True                                                # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True                                              # 6 px, 4 shared
    assert M.db_eval_iou(gt, pred) == pytest.approx(4 / 6)
    void = np.zeros((4, 4), bool)
    void[:, 2] = True                                                # the two extra pixels are void
    assert M.db_eval_iou(gt, pred, void) == 1.0
    void2 = np.zeros((4, 4), bool)
    void2[0, 0] = True                                               # a shared pixel is void: 3 / 5
    assert M.db_eval_iou(gt, pred, void2) == pytest.approx(3 / 5)
    stack = np.stack([gt, a])
    assert M.db_eval_iou(stack, np.stack([pred, a])).tolist() == pytest.approx([4 / 6, 1.0])


def test_boundary_map_is_one_sided_and_ignores_the_image_border():
    m = np.zeros((6, 6), bool)
    m[3, 3] = True
    assert sorted(zip(*np.nonzero(M.seg2bmap(m)))) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert not M.seg2bmap(np.ones((5, 7), bool)).any()               # the frame's border is never a boundary
    half = np.zeros((4, 6), bool)
    half[:, :3] = True                                               # touches top, left, bottom: one vertical edge
    assert sorted(zip(*np.nonzero(M.seg2bmap(half)))) == [(r, 2) for r in range(4)]


def test_tolerance_is_the_ceiling_of_a_fraction_of_the_diagonal():
    assert [M.bound_pix(s) for s in ((480, 854), (240, 427), (64, 64), (90, 160), (200, 356), (360, 640))] == \
        [8, 4, 1, 2, 4, 6]
    assert M.bound_pix((64, 64), 3) == 3                             # >= 1: pixels
    assert M.disk(1).sum() == 5 and M.disk(2).sum() == 13


def test_f_special_cases_and_the_tolerance():
    empty = np.zeros((20, 20), bool)
    full = np.ones((20, 20), bool)
    box = np.zeros((20, 20), bool)
    box[5:12, 5:12] = True
    assert M.f_measure(empty, empty) == 1.0                         # no boundary on either side
    assert M.f_measure(empty, box) == 0.0 and M.f_measure(box, empty) == 0.0
    assert M.f_measure(full, empty) == 1.0 and M.db_eval_iou(empty, full) == 0.0   # a full frame has no boundary
    assert M.f_measure(box, box) == 1.0
    shifted = np.roll(box, 1, axis=1)                                # 1 px: within the 1-px tolerance of 20x20
    assert M.f_measure(shifted, box) == 1.0
    far = np.roll(box, 3, axis=1)                                    # 3 px: only the horizontal edges still match
    f = M.f_measure(far, box)
    assert 0.0 < f < 1.0
    # by hand: each boundary has 14 pixels (rows 4 and 11 ... ) -- count them instead of trusting a formula
    bp, bg = M.seg2bmap(far), M.seg2bmap(box)
    dg = M._dilate(bg, 1)
    dp = M._dilate(bp, 1)
    precision, recall = (bp & dg).sum() / bp.sum(), (bg & dp).sum() / bg.sum()
    assert f == pytest.approx(2 * precision * recall / (precision + recall))


def test_void_pixels_are_cleared_before_the_boundaries():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = gt.copy()
    pred[5:15, 15:18] = True                                         # 3 px too wide on the right
    assert M.f_measure(pred, gt) < 1.0
    void = np.zeros((20, 20), bool)
    void[:, 14:] = True                                              # the disputed band is void
    assert M.f_measure(pred, gt, void) == 1.0
    assert M.db_eval_boundary(np.stack([gt]), np.stack([pred]), np.stack([void])).tolist() == [1.0]


def test_statistics_recall_is_strict_and_decay_uses_overlapping_bins():
    m, r, d = M.db_statistics(np.array([0.5, 0.6, 0.4]))
    assert m == pytest.approx(0.5) and r == pytest.approx(1 / 3)     # 0.5 is not > 0.5
    assert d == pytest.approx((0.5 + 0.6) / 2 - 0.4)                # n = 3: bins {0,1} and {2}
    v = np.arange(9, dtype=float)
    assert M.db_statistics(v)[2] == pytest.approx(np.mean(v[0:3]) - np.mean(v[6:9]))
    assert M.db_statistics(np.array([0.7]))[2] == 0.0
    assert M.db_statistics(np.array([0.9, 0.2]))[2] == pytest.approx(0.7)


def _clip(t=5, h=16, w=16):
    gt = np.zeros((t, h, w), np.uint8)
    gt[:, 2:8, 2:8] = 1
    gt[:, 9:14, 9:14] = 2
    return gt


def test_sequence_scores_frames_one_to_t_minus_two_and_the_first_frames_ids():
    gt = _clip()
    pred = gt.copy()
    pred[0] = 0                                                      # frame 0 and the last frame are not scored
    pred[-1] = 0
    j, f = M.evaluate_sequence(gt, pred)
    assert j.shape == (2, 3) and (j == 1).all() and (f == 1).all()
    late = gt.copy()
    late[2, 0, 0] = 3                                                # an id absent from frame 0: never scored
    assert M.evaluate_sequence(late, gt)[0].shape == (2, 3)
    void_first = gt.copy()
    void_first[0, 0, :] = 255                                        # void is background for K
    assert M.evaluate_sequence(void_first, gt)[0].shape == (2, 3)
    missing = gt.copy()
    missing[missing == 2] = 0                                        # object 2 never predicted: zero masks
    j, f = M.evaluate_sequence(gt, missing)
    assert (j[0] == 1).all() and (j[1] == 0).all() and (f[1] == 0).all()
    extra = gt.copy()
    extra[2, 0, 0] = 3
    with pytest.raises(UpbenchError, match="object id 3"):
        M.evaluate_sequence(gt, extra, "clip")
    with pytest.raises(UpbenchError, match="at least 3 frames"):
        M.evaluate_sequence(gt[:2], gt[:2], "clip")


def test_global_means_are_over_objects_not_sequences():
    one = (np.array([[1.0, 1.0]]), np.array([[1.0, 1.0]]))
    three = (np.zeros((3, 2)), np.zeros((3, 2)))
    out = M.aggregate([("a", *one), ("b", *three)])
    assert out["objects"] == ["a_1", "b_1", "b_2", "b_3"]
    assert out["global"]["J-Mean"] == pytest.approx(0.25)            # per sequence it would be 0.5
    assert out["global"]["J&F-Mean"] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ propagation
def _dense(features, first_seg, n_last=7, radius=12, topk=5, temperature=0.1):
    """VOS.md section 5.2 as written: one (n*P, P) affinity per frame, no tiling, no shortcuts."""
    t_count, c, h, w = features.shape
    p = h * w
    rows = torch.arange(p) // w
    cols = torch.arange(p) % w
    window = (((rows[:, None] - rows[None, :]).abs() <= radius) &
              ((cols[:, None] - cols[None, :]).abs() <= radius)).float()
    first = (features[0], first_seg[0])
    queue, out = [], []
    for t in range(1, t_count):
        ctx = [first] + queue
        tgt = torch.nn.functional.normalize(features[t].reshape(c, p), dim=0).t()             # (P, C)
        aff = []
        for f, _ in ctx:
            a = torch.exp((tgt @ torch.nn.functional.normalize(f.reshape(c, p), dim=0)) / temperature)
            aff.append((a * window if radius > 0 else a).t())                                   # (source, target)
        aff = torch.cat(aff)
        thr = torch.topk(aff, topk, dim=0).values[-1]
        aff[aff < thr] = 0
        aff = aff / aff.sum(0, keepdim=True)
        labels = torch.cat([lab.reshape(lab.shape[0], p) for _, lab in ctx], dim=1)
        seg = (labels @ aff).reshape(1, -1, h, w)
        out.append(seg[0])
        if len(queue) >= n_last:
            queue.pop(0)
        queue.append((features[t], seg[0]))
    return torch.stack(out)


@pytest.mark.parametrize("grid,radius,tile,n_last", [((20, 27), 4, 3, 2), ((20, 27), 4, 8, 7), ((9, 9), 0, None, 3),
                                                     ((11, 13), 2, None, 1)])
def test_tiled_propagation_equals_the_dense_definition(grid, radius, tile, n_last):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, *grid, generator=g)
    ann = np.zeros((grid[0] * 2, grid[1] * 2), np.uint8)
    ann[4:14, 6:20] = 1
    ann[20:, 30:] = 2
    first = P.first_frame_labels(ann, grid)
    prop = P.LabelPropagation(feats[0], first, n_last, radius, 5, 0.1, tile=tile)
    mine = torch.stack([prop.step(feats[t])[0] for t in range(1, 6)])
    ref = _dense(feats, first, n_last, radius, 5, 0.1)
    assert torch.allclose(mine, ref, atol=1e-5, rtol=0)
    assert torch.allclose(mine.sum(1), torch.ones(5, *grid), atol=1e-5)   # a distribution over labels per pixel


def test_ties_with_the_kth_affinity_all_stay():
    # identical features everywhere: every source ties, so all of them are kept (not exactly k)
    feats = torch.ones(2, 3, 4, 4)
    first = torch.zeros(1, 2, 4, 4)
    first[0, 1, 0, :] = 1.0                                           # one row of 16 is object 1
    first[0, 0] = 1 - first[0, 1]
    seg = P.LabelPropagation(feats[0], first, 7, 12, 5, 0.1).step(feats[1])
    assert torch.allclose(seg[0, 1], torch.full((4, 4), 4 / 16))


def test_first_labels_hard_labels_and_pil_nearest():
    ann = np.zeros((7, 9), np.uint8)
    ann[2:5, 3:7] = 2                                                 # id 1 absent: an all-zero channel
    one_hot = P.first_frame_labels(ann, (3, 4))
    assert one_hot.shape == (1, 3, 3, 4) and torch.equal(one_hot.sum(1), torch.ones(1, 3, 4))
    assert not one_hot[0, 1].any()
    expected = np.asarray(Image.fromarray(ann).resize((4, 3), Image.NEAREST))
    assert np.array_equal(P.pil_nearest(ann, (3, 4)), expected)
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 0] = 0.6
    seg[0, 0, 1, 1] = 0.9
    seg[0, 2, 0, 0] = 0.5                                             # object 2 weaker than background here...
    up, labels = P.hard_labels(seg, (4, 4), (8, 8))
    # ...but each channel is stretched to [0, 1] before the arg-max, so object 2 wins where it is largest
    assert up.dtype == torch.uint8 and labels.shape == (8, 8)
    assert int(up[0, 0]) == 2 and int(up[3, 3]) == 0 and int((up == 2).sum()) >= 1
    assert np.array_equal(labels, np.asarray(Image.fromarray(up.numpy()).resize((8, 8), Image.NEAREST)))
    # the official quirk: a constant positive channel becomes 0/0 = NaN, and NaN wins the arg-max everywhere
    seg[0, 0] = 0.6
    assert not P.hard_labels(seg, (4, 4), (8, 8))[0].any()


# ------------------------------------------------------------------------------------------------ data
def _davis_tree(root: Path, sequences, size=(40, 64), frames=4):
    """A DAVIS-layout folder: sequence name -> first annotation's object ids (later frames move them by 1 px)."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")
    rng = np.random.default_rng(0)
    for name, first in sequences.items():
        jpg = root / "JPEGImages" / "480p" / name
        png = root / "Annotations" / "480p" / name
        jpg.mkdir(parents=True)
        png.mkdir(parents=True)
        for t in range(frames):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(jpg / f"{t:05d}.jpg")
            lab = np.roll(first, t, axis=1)
            img = Image.fromarray(lab.astype(np.uint8))
            img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
            img.save(png / f"{t:05d}.png")
    return root


def test_davis_layout_and_its_errors(tmp_path):
    with pytest.raises(UpbenchError, match=r"JPEGImages/480p/<seq>/\*\.jpg.*ImageSets/2017/val\.txt") as err:
        DATASETS.create("davis", root=str(tmp_path / "nowhere"), split="val")
    assert "\n" not in str(err.value) and "dataset.root" in str(err.value)
    ann = np.zeros((40, 64), np.uint8)
    ann[10:20, 10:30] = 1
    root = _davis_tree(tmp_path / "d", {"a": ann, "b": ann})
    ds = DATASETS.create("davis", root=str(root), split="val")
    assert [ds[i]["id"] for i in range(len(ds))] == ["a", "b"] and ds.kind == "video"
    seq = ds[0]["sequence"]
    assert len(seq) == 4 and seq.image(0).size == (64, 40) and seq.annotation(1).dtype == np.uint8
    assert np.array_equal(seq.annotation(1), np.roll(ann, 1, axis=1))
    (root / "Annotations" / "480p" / "b" / "00002.png").unlink()
    with pytest.raises(UpbenchError, match="'b' has 4 frames but 3 annotations.*00002.png"):
        DATASETS.create("davis", root=str(root), split="val")


def test_the_command_line_names_a_missing_davis_and_a_non_video_set(cli, tmp_path):
    out = cli(["run", "task=vos", "backbone=demo", "upsampler=bilinear", "dataset=davis",
               f"dataset.root={tmp_path / 'no_davis'}"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "no_davis" in line and "Annotations/480p/<seq>/*.png" in line and "dataset.root" in line
    out = cli(["run", "task=vos", "backbone=demo", "upsampler=bilinear", "dataset=demo"])
    assert out.returncode == 2 and "task=vos needs a video dataset" in out.stderr


def test_davis_mini_is_the_shared_clip_set():
    need(DAVIS_MINI)
    cfg = to_container(compose(["task=vos", "dataset=davis_mini"]))
    assert Path(cfg["dataset"]["root"]).resolve() == DAVIS_MINI.resolve()
    ds = DATASETS.create("davis_mini", root=cfg["dataset"]["root"], split="val")
    assert [ds[i]["id"] for i in range(len(ds))] == ["coco-sheep", "coco-bears", "coco-cyclist", "coco-cat"]
    assert [len(ds[i]["sequence"]) for i in range(len(ds))] == [10, 12, 10, 12]
    assert [M.num_objects(ds[i]["sequence"].annotation(0)) for i in range(len(ds))] == [3, 2, 2, 1]


def test_presets_set_each_implementations_geometry():
    lo = to_container(compose(["protocol=loftup_table4"]))
    assert (lo["task"]["name"], lo["backbone"]["name"], lo["dataset"]["name"]) == ("vos", "dinov2_s14", "davis")
    assert lo["task"]["propagation"] == {"implementation": "loftup", "imsize": 224, "ups_factor": 1,
                                         "n_last_frames": 7, "radius": 12, "topk": 5, "temperature": 0.1}
    naf = to_container(compose(["protocol=naf_vos"]))
    assert naf["task"]["propagation"]["implementation"] == "naf" and naf["task"]["propagation"]["ups_factor"] == 1
    from upbench.runner import check_protocol

    with pytest.raises(UpbenchError, match="protocol=loftup_table4 defines vos only"):
        check_protocol(to_container(compose(["protocol=loftup_table4", "task=seg"])))
    from upbench.tasks.vos import Geometry, check_propagation

    with pytest.raises(UpbenchError, match="task.propagation.implementation"):
        check_propagation({**lo["task"]["propagation"], "implementation": "dino"})
    with pytest.raises(UpbenchError, match="task.propagation.temperature"):
        check_propagation({**lo["task"]["propagation"], "temperature": 0})
    geo = Geometry(check_propagation(lo["task"]["propagation"]), 14, (480, 854))
    assert (geo.input, geo.requested, geo.prediction) == ((224, 224), (112, 112), (224, 224))
    geo = Geometry(check_propagation({**naf["task"]["propagation"], "ups_factor": 4}), 16, (480, 854))
    assert (geo.input, geo.requested, geo.prediction) == ((480, 848), (120, 212), (480, 848))


def _run(tmp_path, *extra):
    from upbench.runner import run_job

    cfg = compose(["task=vos", "backbone=demo", "upsampler=bilinear", "upsampler.weights=null", "threads=1",
                   f"paths.results={tmp_path}", "dataset=davis", f"dataset.root={tmp_path / 'd'}",
                   "task.propagation.imsize=32", *extra])
    return run_job(cfg, log=lambda *_: None)


def test_a_run_without_objects_is_a_recorded_failure_and_void_in_the_first_frame_an_error(tmp_path):
    _davis_tree(tmp_path / "d", {"empty": np.zeros((40, 64), np.uint8)})
    with pytest.raises(RunFailed, match="nothing to score"):
        _run(tmp_path)
    assert len(list((tmp_path / "failed").glob("*.json"))) == 1 and not list((tmp_path / "rows").glob("*.json"))
    void = np.zeros((40, 64), np.uint8)
    void[5:9, 5:9] = 1
    void[0, :] = 255
    _davis_tree(tmp_path / "v", {"voided": void})
    with pytest.raises(UpbenchError, match=r"00000.png: the first annotation has void \(255\)"):
        _run(tmp_path, f"dataset.root={tmp_path / 'v'}")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def davis_mini_rows(tmp_path_factory):
    """``upbench run -m task=vos dataset=davis_mini backbone=demo upsampler=bilinear,lowres`` at 64 px on two clips."""
    need(DAVIS_MINI)
    from upbench.cli import main

    results = tmp_path_factory.mktemp("vos") / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPBENCH_RESULTS", str(results))
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            main(["run", "-m", "task=vos", "dataset=davis_mini", "backbone=demo", "upsampler=bilinear,lowres",
                  "upsampler.weights=null", "dataset.limit_val=2", "task.propagation.imsize=64", "threads=1",
                  "task.save_predictions=true", "task.cache.features=true"])
        except SystemExit as exc:
            assert not exc.code, exc.code
    rows = {r["upsampler"]: r for r in (json.loads(p.read_text()) for p in (results / "rows").glob("*.json"))}
    return results, rows


def test_davis_mini_end_to_end_row_and_saved_predictions(davis_mini_rows):
    results, rows = davis_mini_rows
    assert sorted(rows) == ["bilinear", "lowres"]
    row = rows["bilinear"]
    m, data = row["metrics"], row["data"]
    assert row["task"] == "vos" and row["dataset"] == "davis_mini" and row["status"] == "ok"
    assert m["jf"] == pytest.approx((m["j_mean"] + m["f_mean"]) / 2) and 0 < m["f_mean"] < m["j_mean"] <= 100
    assert data["propagation"] == "loftup" and data["label_grid"] == [32, 32] and data["feature_grid"] == [4, 4]
    assert rows["lowres"]["data"]["label_grid"] == [4, 4]               # low-res features keep their own grid
    assert (data["n_sequences"], data["n_objects"], data["n_frames"]) == (2, 5, 22)
    assert row["timing"]["upsampler_ms"] > 0 and row["timing"]["propagation_ms"] > 0
    # the label maps it wrote, re-scored from the files, give the row's numbers
    ds = DATASETS.create("davis_mini", root=row["config"]["dataset"]["root"], split="val")
    folder = results / row["artefacts"]["predictions"]
    seqs = []
    for i in range(2):
        seq = ds[i]["sequence"]
        pred = np.stack([np.array(Image.open(folder / seq.name / f"{n}.png")) for n in seq.frame_names])
        assert Image.open(folder / seq.name / "00001.png").mode == "P"
        seqs.append({"name": seq.name, "gt": np.stack([seq.annotation(t) for t in range(len(seq))]), "pred": pred})
        assert np.array_equal(pred[0], seqs[-1]["gt"][0])              # frame 0 is the given annotation
    scores = M.evaluate(seqs)["global"]
    assert scores["J&F-Mean"] * 100 == pytest.approx(m["jf"]) and scores["F-Mean"] * 100 == pytest.approx(m["f_mean"])


def test_a_finer_upsampler_beats_low_res_features_on_davis_mini(davis_mini_rows):
    _, rows = davis_mini_rows
    fine, low = rows["bilinear"]["metrics"], rows["lowres"]["metrics"]
    assert fine["jf"] > low["jf"] + 10 and fine["f_mean"] > low["f_mean"] + 10
    per = {k: (rows["bilinear"]["data"]["per_sequence"][k], v) for k, v in rows["lowres"]["data"]["per_sequence"].items()}
    assert all(b["J"] + b["F"] > lo["J"] + lo["F"] for b, lo in per.values())


def test_the_report_has_loftups_layout_and_its_published_rows(davis_mini_rows, tmp_path, cli):
    results, rows = davis_mini_rows
    out = cli(["report"], results=results)
    assert out.returncode == 0
    header = next(line for line in out.stdout.splitlines() if "J&F" in line)
    assert header.index("J mean") < header.index("F mean") < header.index("J&F") and "DAVIS mini" in header
    # the same rows as if run with DINOv2-S/14 on DAVIS: --paper adds LoftUp's Table 4 below them
    paper_dir = tmp_path / "paper"
    (paper_dir / "rows").mkdir(parents=True)
    for name, row in rows.items():
        row = {**row, "backbone": "dinov2_s14", "dataset": "davis",
               "config": {**row["config"], "backbone": {"name": "dinov2_s14"}, "dataset": {"name": "davis"}}}
        (paper_dir / "rows" / f"{row['config_hash']}.json").write_text(json.dumps(row))
    out = cli(["report", "--paper"], results=paper_dir)
    assert out.returncode == 0
    text = out.stdout
    assert "LoftUp (paper)" in text and "60.25" in text and "36.66" in text and "LoftUp (arXiv 2504.14032)" in text
    header = [c.strip() for c in next(line for line in text.splitlines() if "J&F" in line).split("|")]
    loftup = [c.strip() for c in next(line for line in text.splitlines()
                                      if line.startswith("| LoftUp (paper)")).split("|")]
    assert [loftup[header.index(f"DAVIS-2017 {m}")] for m in ("J mean", "F mean", "J&F")] == \
        ["58.72", "61.79", "60.25"]
