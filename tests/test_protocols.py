"""Every switch that makes upbench's numbers mean what a paper's mean, pinned against hand-computed or official
values, and the named presets that set them: each composes, prints its resolved values, runs end to end on the
shared data with the demo backbone, and refuses tasks it does not define."""
import json
from pathlib import Path
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS, need
from upbench.config import compose, to_container
from upbench.errors import UpbenchError
from upbench.registry import DATASETS, UPSAMPLERS

DATA = ASSETS / "data"
SETS = [("voc", "voc2012_val14"), ("ade20k", "ade20k_val30"), ("cityscapes", "cityscapes_tiny1"),
        ("cocostuff", "cocostuff_val35")]
#: every preset shipped in configs/protocol/ (a new one is checked without editing this file)
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "protocol").glob("*.yaml")
                 if p.stem != "none")
assert {"uplift_table1", "uplift_table8", "jafar_released", "naf", "loftup_table3", "loftup_table4"} <= set(PRESETS)


def _official_label(ds, index, size):
    """The suites' label transform done their way: torchvision Resize(size, NEAREST_EXACT) + CenterCrop on the PIL
    label (the class-id mapping is pointwise, so it may come first)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    arr = ds.read_label(ds.pairs[index][1])
    if ds.label_map is not None:
        arr = ds.label_map[arr]
    pil = Image.fromarray(arr.astype(np.uint8) if arr.max() < 256 else arr.astype(np.int32))
    out = TF.center_crop(TF.resize(pil, size, interpolation=InterpolationMode.NEAREST_EXACT), [size, size])
    return torch.from_numpy(np.asarray(out).astype(np.int64))


@pytest.mark.parametrize("name,folder", SETS)
def test_label_resize_is_the_official_transform_on_every_shared_set(name, folder):
    root = need(DATA / folder)
    ours = DATASETS.create(name, root=str(root), split="val", img_size=448)
    tensor_way = DATASETS.create(name, root=str(root), split="val", img_size=448, label_resize="nearest_exact")
    differing = 0
    for i in range(len(ours)):
        official = _official_label(ours, i, 448)
        assert int((ours[i]["label"] != official).sum()) == 0, (name, i)
        differing += int((tensor_way[i]["label"] != official).sum())
    if name in ("ade20k", "cityscapes"):
        assert differing > 0   # the tensor resize rounds exact ties the other way: the switch matters


def test_cocostuff_reads_the_curated_list_of_the_stego_layout(tmp_path):
    src = need(DATA / "cocostuff_val35")
    root = tmp_path / "cocostuff"
    for sub, dst in (("images", "dataset/images/val2017"), ("stuffthingmaps", "dataset/annotations/val2017")):
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        (root / dst).symlink_to(src / sub)
    ids = sorted(p.stem for p in (src / "images").glob("*.jpg"))
    (root / "curated" / "val2017").mkdir(parents=True)
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("\n".join(ids[:7]) + "\n")
    curated = DATASETS.create("cocostuff", root=str(root), split="val", img_size=64)
    assert len(curated) == 7 and curated.flags["image_list"] == "curated"
    every = DATASETS.create("cocostuff", root=str(root), split="val", img_size=64, image_list="all")
    assert len(every) == len(ids) and every.flags["image_list"] == "all"
    assert DATASETS.create("cocostuff", root=str(src), split="val", img_size=64).flags["image_list"] == "all"


def test_the_probe_reads_each_upsampler_at_its_own_size_when_the_logits_are_resized():
    from upbench.pipeline import Pipeline, build_backbone

    bb = build_backbone({"kind": "demo", "name": "demo"})
    expected = {"featup": (512, 512), "lift": (512, 512), "lift_2x": (64, 64), "uplift": (512, 512),
                "lowres": (32, 32), "bilinear": (448, 448), "jafar": (448, 448)}
    for name, native in expected.items():
        pipe = Pipeline(bb, UPSAMPLERS.create(name, in_channels=112, patch_size=16), torch.device("cpu"))
        assert pipe.probe_size((32, 32), (448, 448), "logits") == native, name
        assert pipe.probe_size((32, 32), (448, 448), "features") == ((32, 32) if name == "lowres" else (448, 448))
    with pytest.raises(UpbenchError, match="resize_at"):
        pipe.probe_size((32, 32), (448, 448), "somewhere")


class _Spy(torch.nn.Module):
    """A backbone that records what it was fed."""
    name, channels, patch_size, mean, std, identity = "spy", 3, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "spy"

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.nn.functional.avg_pool2d(x, 4), x.new_zeros(x.shape[0], 0, 3)


def test_input_norm_and_the_backbone_side_switches():
    from upbench.pipeline import Pipeline

    image = torch.rand(1, 3, 16, 16)
    up = UPSAMPLERS.create("bilinear")
    spy = _Spy()
    Pipeline(spy, up, torch.device("cpu")).encode(image)
    assert torch.allclose(spy.seen[-1], (image - 0.5) / 0.25)
    pipe = Pipeline(spy, up, torch.device("cpu"), input_norm="official_unnormalised")
    pipe.encode(image)
    assert torch.equal(spy.seen[-1], image) and torch.equal(pipe.guidance(image), image)
    Pipeline(spy, up, torch.device("cpu"), backbone_scale=2.0).encode(image)
    assert spy.seen[-1].shape[-2:] == (32, 32)
    Pipeline(spy, up, torch.device("cpu"), feature_grid=3).encode(image)
    assert spy.seen[-1].shape[-2:] == (12, 12)                       # 3 features of patch 4 per side
    Pipeline(spy, UPSAMPLERS.create("input2x"), torch.device("cpu")).encode(image)
    assert spy.seen[-1].shape[-2:] == (32, 32)                       # the 2x-input baseline
    with pytest.raises(UpbenchError, match="input_norm"):
        Pipeline(spy, up, torch.device("cpu"), input_norm="raw")


def test_optimizers_and_the_constant_schedule():
    from upbench.tasks._probe import make_optimizer, make_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], {"optimizer": "nadam", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0})
    assert isinstance(opt, torch.optim.NAdam)
    sched, per_iter = make_scheduler(opt, "constant", 3, 4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1e-4] * 12 and not per_iter
    with pytest.raises(UpbenchError, match="optimizer"):
        make_optimizer([p], {"optimizer": "sgd", "lr": 1.0})


def test_jafar_pseudo_depth_runs_on_the_probe_crop_and_its_flip(tmp_path):
    from test_depth import COCO, _tiny_depth_anything

    need(COCO)
    model = _tiny_depth_anything(tmp_path / "da")
    ds = DATASETS.create("coco_depth", root=str(COCO), split="val", img_size=56, cache_dir=str(tmp_path / "c"),
                         pseudo_model=str(model), pseudo_protocol="jafar", image_list="all")
    item = ds[0]
    assert item["depth"].shape == item["depth_flip"].shape == (56, 56)
    assert ds.flags == {"image_list": "all", "pseudo_protocol": "jafar"}
    # by hand: the crop x 255 truncated to uint8, the model, bilinear to 56 x 56
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    m, proc = AutoModelForDepthEstimation.from_pretrained(str(model)), AutoImageProcessor.from_pretrained(str(model))
    pixels = (255 * item["image"].flip(-1).permute(1, 2, 0).numpy()).astype(np.uint8)
    with torch.inference_mode():
        pred = m(**proc(images=pixels, return_tensors="pt")).predicted_depth
    want = torch.nn.functional.interpolate(pred[:, None], size=(56, 56), mode="bilinear", align_corners=False)[0, 0]
    scale = want.abs().max()                 # the random tiny model's maps are ~1e-7: compare relative to it
    assert scale > 0 and torch.allclose(item["depth_flip"], want, rtol=1e-4, atol=1e-4 * float(scale))
    # a separate prediction on the flipped crop, not the unflipped map mirrored
    assert (item["depth_flip"] - item["depth"].flip(-1)).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_names_its_sources(preset):
    cfg = to_container(compose([f"protocol={preset}"]))
    meta = cfg["protocol"]
    assert meta["name"] == preset and meta["description"] and meta["sources"] and meta["unstated"] and meta["tasks"]
    for task in meta["tasks"]:
        c = to_container(compose([f"protocol={preset}", f"task={task}"]))
        assert c["task"]["name"] == task and c["protocol"]["name"] == preset


def test_preset_values_are_the_published_ones():
    t1 = to_container(compose(["protocol=uplift_table1", "task=seg"]))
    assert (t1["backbone"]["name"], t1["dataset"]["img_size"], t1["task"]["probe"]["lr"],
            t1["task"]["probe"]["epochs"], t1["task"]["probe"]["lr_schedule"], t1["task"]["resize_at"]) == \
        ("dinov2_s14", 448, 5e-4, 20, "per_epoch", "logits")
    d1 = to_container(compose(["protocol=uplift_table1", "task=depth"]))
    assert (d1["task"]["probe"]["lr"], d1["task"]["probe"]["epochs"], d1["task"]["probe"]["grad_loss"],
            d1["task"]["input_norm"], d1["dataset"]["pseudo_protocol"]) == \
        (5e-3, 5, "jafar_released", "official_unnormalised", "jafar")
    assert to_container(compose(["protocol=jafar_released"]))["task"]["probe"]["lr_schedule"] == "per_iter_jafar"
    assert to_container(compose(["protocol=naf"]))["task"]["probe"]["lr_schedule"] == "per_iter_total"
    lo = to_container(compose(["protocol=loftup_table3"]))
    assert (lo["dataset"]["img_size"], lo["task"]["probe"]["optimizer"], lo["task"]["probe"]["lr"],
            lo["task"]["probe"]["epochs"], lo["task"]["probe"]["batch_size"], lo["task"]["resize_at"]) == \
        (224, "nadam", 1e-4, 10, 8, "labels")
    t4 = to_container(compose(["protocol=uplift_table4"]))
    assert (t4["task"]["name"], t4["backbone"]["name"], t4["task"]["factor"], t4["dataset"]["img_size"]) == \
        ("generative", "sd15_vae", 4, 1024)
    t2 = to_container(compose(["protocol=uplift_table2"]))
    assert (t2["task"]["name"], t2["dataset"]["name"], t2["task"]["steps"], t2["task"]["factor"]) == \
        ("t2i_upscale", "coco_captions", 25, 2)


def test_a_preset_refuses_a_task_it_does_not_define(tmp_path):
    from upbench.runner import run_job

    cfg = to_container(compose(["protocol=naf", "task=depth", f"paths.results={tmp_path}"]))
    with pytest.raises(UpbenchError, match="protocol=naf defines seg only"):
        run_job(cfg, log=lambda *_: None)


def test_cfg_job_prints_the_resolved_preset(tmp_path):
    env = {**os.environ, "UPBENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "upbench", "run", "protocol=loftup_table3", "--cfg", "job"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "optimizer: nadam" in out.stdout and "resize_at: labels" in out.stdout and "img_size: 224" in out.stdout
    assert "name: loftup_table3" in out.stdout


VOC_SMALL = ["backbone=demo", "upsampler.weights=null", "dataset=voc", f"dataset.root={DATA / 'voc2012_val14'}",
             "dataset.img_size=64", "dataset.train_split='val[:6]'", "dataset.val_split='val[6:9]'",
             "task.probe.epochs=1", "task.cache.upsampled_gb=0"]


@pytest.mark.slow
@pytest.mark.parametrize("preset,extra", [
    ("uplift_table1", ["task=seg", "upsampler=featup"]), ("uplift_table8", ["task=seg", "upsampler=bilinear"]),
    ("jafar_released", ["task=seg", "upsampler=lift"]), ("naf", ["task=seg", "upsampler=bilinear"]),
    ("loftup_table3", ["task=seg", "upsampler=lowres"]),
    ("none", ["task=seg", "upsampler=bilinear", "task.feature_grid=8"]), ("none", ["task=seg", "upsampler=input2x"]),
])
def test_seg_presets_run_end_to_end_on_shared_data(preset, extra, tmp_path):
    need(DATA / "voc2012_val14")
    from upbench.runner import run_job

    cfg = to_container(compose([f"protocol={preset}", *extra, *VOC_SMALL, f"paths.results={tmp_path}"]))
    row = run_job(cfg, log=lambda *_: None)
    assert row["status"] == "ok"
    assert (row["config"].get("protocol") or {}).get("name") == (None if preset == "none" else preset)
    assert 0 <= row["metrics"]["miou"] <= 100 and row["data"]["label_resize"] == "pil_nearest"
    if preset == "loftup_table3":
        assert row["data"]["probe_size"] == [4, 4]       # the low-res grid: labels come to it
    if "task.feature_grid=8" in extra:
        assert row["data"]["feature_grid"] == [8, 8] and row["data"]["probe_size"] == [64, 64]   # 8x8 for 64 px
    if "upsampler=input2x" in extra:
        assert row["data"]["feature_grid"] == [8, 8]     # the backbone saw 128 px
    if preset == "uplift_table1":
        assert row["data"]["probe_size"] == [64, 64]     # FeatUp's own 16x of a 4x4 grid: logits resized


@pytest.mark.slow
def test_depth_and_generative_presets_run_end_to_end(tmp_path):
    from upbench.runner import run_job

    depth = to_container(compose(["protocol=uplift_table1", "task=depth", "backbone=demo", "upsampler=bilinear",
                                  "dataset=demo_depth", "dataset.img_size=64", "dataset.num_images=3",
                                  "dataset.limit_val=2", "task.probe.epochs=1", "task.probe.cls_token=false",
                                  "task.probe.batch_size=3", f"paths.results={tmp_path}"]))
    row = run_job(depth, log=lambda *_: None)
    assert row["status"] == "ok" and row["data"]["grad_loss"] == "jafar_released"
    need(ASSETS / "weights" / "taef2_encoder.pth")
    gen = to_container(compose(["protocol=uplift_table4", "backbone=taef2", "upsampler=bilinear", "dataset=demo_images",
                                "dataset.img_size=64", "dataset.limit_val=2", "task.fid=false",
                                f"paths.results={tmp_path}"]))
    row = run_job(gen, log=lambda *_: None)
    assert row["status"] == "ok" and row["config"]["task"]["factor"] == 4 and row["metrics"]["psnr"] > 0


def test_the_report_never_mixes_presets_and_flags_the_image_list():
    from upbench import report
    from upbench.results import config_hash, frame
    from upbench.schema import build_row

    def row(preset, miou, image_list="curated", dataset="cocostuff"):
        cfg = to_container(compose([f"protocol={preset}", "task=seg", f"dataset={dataset}", "upsampler=bilinear"]))
        return build_row(cfg, config_hash(cfg), "ok", metrics={"miou": miou, "acc": 90.0}, timing={"upsampler_ms": 1.0},
                         params={"upsampler": 0}, data={"image_list": image_list})

    rows = [row("uplift_table1", 40.0), row("naf", 41.0), row("uplift_table1", 42.0, "all", "cocostuff")]
    rows[2]["config"]["seed"] = 1
    from upbench.registry import TASKS

    tables = report.task_tables(frame(rows), "seg", TASKS.get("seg").table)
    assert len(tables) == 2
    assert sorted("protocol naf," in t.title for t in tables) == [False, True]
    assert sorted("protocol uplift_table1," in t.title for t in tables) == [False, True]
    t1 = next(t for t in tables if "uplift_table1" in t.title)
    groups = sorted({c[0] for _, cells in t1.rows for c in cells if isinstance(c, tuple) and c[0]})
    assert groups == ["COCO (all)", "COCO (curated)"]   # "all" is never averaged with the papers' list


@pytest.mark.slow
def test_uplift_ablation_drivers_train_and_evaluate_every_variant(cli, tmp_path):
    """The README's Table 6 / 7 drivers, tiny: one multirun trains an UPLiFT per (attender, depth set) into its own
    folder, a second probes each trained attender variant with its weights."""
    need(DATA / "voc2012_val14")
    from safetensors import safe_open

    results = tmp_path / "results"
    out = "${paths.results}/train/att${upsampler.kwargs.attender}-d${join:${train.depths}}"
    train = cli(["train", "-m", "backbone=demo", "data.root=builtin:skimage", "data.img_size=64", "data.limit=2",
                 "train.batch_size=2", "train.max_steps=1", "threads=1", "upsampler.kwargs.attender=5,none",
                 "train.depths=[1],[1,2]", f"train.out_dir='{out}'"], results=results)
    assert train.returncode == 0, train.stderr[-2000:]
    folders = sorted(p.name for p in (results / "train").iterdir())
    assert folders == ["att5-d1", "att5-d1-2", "attnone-d1", "attnone-d1-2"], folders
    with safe_open(str(results / "train" / "att5-d1-2" / "uplift_demo.safetensors"), framework="pt") as fh:
        meta = {k: json.loads(v) for k, v in fh.metadata().items()}
        assert meta["depths"] == [1, 2] and meta["upsampler_kwargs"]["attender"] == 5
        assert fh.get_tensor("attender.conv1.weight").shape[0] == 5            # 5 neighbour logits
    weights = "${paths.results}/train/att${upsampler.kwargs.attender}-d1-2/uplift_demo.safetensors"
    run = cli(["run", "-m", "task=seg", "upsampler=uplift", "upsampler.kwargs.attender=5,none",
               f"upsampler.weights='{weights}'", *[o for o in VOC_SMALL if not o.startswith("upsampler.")]],
              results=results)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (results / "rows").glob("*.json")]
    assert sorted(str(r["config"]["upsampler"]["kwargs"]["attender"]) for r in rows if r["status"] == "ok") == \
        ["5", "none"]


def test_list_names_every_preset_and_the_append_form_is_accepted(cli, tmp_path):
    out = cli(["list"])
    assert out.returncode == 0
    for preset in PRESETS:
        assert any(line.split()[:1] == [preset] and len(line.split()) > 3 for line in out.stdout.splitlines()), preset
    job = cli(["run", "+protocol=uplift_table8", "--cfg", "job"])
    assert job.returncode == 0 and "name: uplift_table8" in job.stdout and "dinov3" in job.stdout
    bad = cli(["run", "protocol=uplift_tabel1"])
    assert bad.returncode == 2 and "unknown protocol 'uplift_tabel1'" in bad.stderr and "uplift_table1" in bad.stderr
