"""Depth probe: the bin head, the losses and metrics against hand-computed values, the loaders on the shared real
data, the embedded procedural set, one end-to-end run per dataset kind, and the report's depth columns."""
import math

import numpy as np
import pytest
import torch

from conftest import ASSETS, need
from upbench.tasks.depth import BinDepthHead, depth_metrics, gradient_loss, sig_loss, valid_mask
from upbench.data import DATASETS
from upbench.errors import UpbenchError

DATA = ASSETS / "data"


# ------------------------------------------------------------------------------------------------ head / losses
def test_bin_head_is_an_expectation_over_linear_bins():
    head = BinDepthHead(8, bins=256)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.zero_()
        x = torch.randn(2, 8, 5, 6)
        flat = head(x)  # all logits 0 -> uniform over the bins -> mean of the centres
        assert flat.shape == (2, 1, 5, 6)
        assert torch.allclose(flat, torch.full_like(flat, (1e-3 + 10.0) / 2), atol=1e-5)
        head.conv.bias[255] = 1e6  # one bin dominates -> its centre
        assert torch.allclose(head(x), torch.full_like(flat, 10.0), atol=1e-3)
        head.conv.weight.normal_()
        y = head(x * 100)
        assert y.min() >= 1e-3 and y.max() <= 10.0


def test_sig_loss_by_hand():
    gt = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    pred = torch.tensor([[2.0, 3.0, 4.0, 7.0]])
    mask = valid_mask(gt)
    g = [math.log(2.001 / 1.001), math.log(3.001 / 2.001), 0.0]  # the invalid pixel (gt = 0) is left out
    mean = sum(g) / 3
    var = sum((v - mean) ** 2 for v in g) / 2  # unbiased, as torch.var
    assert sig_loss(pred, gt, mask).item() == pytest.approx(math.sqrt(var + 0.15 * mean ** 2), rel=1e-5)
    assert sig_loss(pred, gt, mask, warmup=True).item() == pytest.approx(math.sqrt(0.15 * mean ** 2), rel=1e-5)
    assert sig_loss(gt.clamp_min(1), gt.clamp_min(1), torch.ones_like(mask)).item() == pytest.approx(0.0, abs=1e-6)


def test_probe3d_gradient_loss_by_hand():
    """Probe3D's fixed loss: neighbours two pixels apart, at strides 1, 2, 4 and 6, over the valid pixels."""
    gt = torch.ones(1, 1, 6, 6)
    mask = torch.ones_like(gt, dtype=torch.bool)
    assert gradient_loss(gt * 3, gt, mask).item() == pytest.approx(0.0, abs=1e-6)   # a constant ratio has no gradient
    pred = torch.ones(1, 1, 6, 6)
    pred[..., :, 3:] = 2.0    # columns 3..5 are twice as far
    step = math.log(2.001 / 1.001)
    # stride 1: horizontal pairs (c, c+2) that cross the step: (1,3), (2,4) -> 2 per row x 6 rows, over 36 pixels;
    # stride 2 keeps columns 0, 2, 4: the one pair (0, 4) crosses, 3 rows, over 9 pixels;
    # strides 4 (columns 0, 4) and 6 (column 0) have no pair two apart
    want = 12 * step / 36 + 3 * step / 9
    assert gradient_loss(pred, gt, mask).item() == pytest.approx(want, rel=1e-5)
    # an invalid pixel drops the pairs it is in and the count
    mask2 = mask.clone()
    mask2[0, 0, 0, 1] = False
    want2 = 11 * step / 35 + 3 * step / 9
    assert gradient_loss(pred, gt, mask2).item() == pytest.approx(want2, rel=1e-5)


def test_jafar_released_gradient_loss_is_zero_at_batch_two_and_not_at_three():
    from upbench.tasks.depth import gradient_loss_jafar_released as released

    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 1, 8, 8, generator=g) + 0.5
    gt = torch.rand(3, 1, 8, 8, generator=g) + 0.5
    mask = torch.ones_like(gt, dtype=torch.bool)
    assert released(pred[:2], gt[:2], mask[:2]).item() == 0.0            # exactly, whatever the maps
    assert released(pred[:1], gt[:1], mask[:1]).item() == 0.0
    # batch 3: at every stride (the maps are subsampled spatially, the batch is not) its "vertical" term compares
    # items 0 and 2 pixel by pixel, over all valid pixels of the three items; its "horizontal" term is empty
    d = torch.log(pred + 1e-3) - torch.log(gt + 1e-3)
    want = 0.0
    for s in (1, 2, 4, 6):
        ds = d[..., ::s, ::s]
        want += float((ds[0] - ds[2]).abs().sum()) / ds.numel()
    assert released(pred, gt, mask).item() == pytest.approx(want, rel=1e-5) and want > 0
    assert gradient_loss(pred, gt, mask).item() != pytest.approx(want, rel=1e-3)


def test_depth_metrics_by_hand():
    gt = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.0, 12.0])  # the last two are outside (1e-3, 10): ignored
    pred = torch.tensor([1.0, 2.4, 3.0, 8.0, 5.0, 5.0])
    m = depth_metrics(pred, gt)
    p, g = np.array([1.0, 2.4, 3.0, 8.0]), np.array([1.0, 2.0, 4.0, 8.0])
    ratio = np.maximum(p / g, g / p)  # 1, 1.2, 1.333, 1
    err = np.log(p) - np.log(g)
    assert m["d1"] == pytest.approx(75.0) and m["d2"] == pytest.approx(100.0) and m["d3"] == pytest.approx(100.0)
    assert m["abs_rel"] == pytest.approx(np.mean(np.abs(g - p) / g))
    assert m["sq_rel"] == pytest.approx(np.mean((g - p) ** 2 / g))
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean((g - p) ** 2)))
    assert m["log_rmse"] == pytest.approx(math.sqrt(np.mean(err ** 2)))
    assert m["log10"] == pytest.approx(np.mean(np.abs(np.log10(p) - np.log10(g))))
    assert m["silog"] == pytest.approx(math.sqrt(np.mean(err ** 2) - np.mean(err) ** 2) * 100)
    assert ratio[1] < 1.25 < ratio[2]
    assert depth_metrics(pred, torch.zeros(6)) is None


# ------------------------------------------------------------------------------------------------ datasets
def test_nyu_flat_layout_metric_depth():
    root = need(DATA / "nyu_tiny1")
    ds = DATASETS.create("nyuv2", root=str(root), split="test", img_size=96)
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and item["depth"].shape == (96, 96)
    d = item["depth"]
    assert 0.3 < d[d > 0].min() and d.max() <= 10.0  # metres (PNG millimetres / 1000)
    assert (d > 0).float().mean() > 0.5


def test_midas_folder_pseudo_depth_scaled_into_bins():
    root = need(DATA / "imagenet_midas_depth25")
    ds = DATASETS.create("depth_folder", root=str(root), split="val", img_size=64)
    assert len(ds) == 25
    d = ds[3]["depth"]
    assert d.shape == (64, 64) and d.max() <= 10.0 + 1e-4 and d.max() > 5.0 and (d > 0).float().mean() > 0.9


def test_middlebury_inverse_disparity():
    root = need(DATA / "middlebury2014_motorcycle")
    ds = DATASETS.create("middlebury", root=str(root), split="val", img_size=128)
    item = ds[0]
    d = item["depth"]
    assert len(ds) == 1 and d.shape == (128, 128) and d.max() <= 10.0 + 1e-4
    assert 0.5 < (d > 0).float().mean() < 1.0  # unknown disparities stay holes


def test_missing_depth_data_is_a_clear_error(tmp_path):
    with pytest.raises(UpbenchError, match="nyuv2: no images found.*official_splits"):
        DATASETS.create("nyuv2", root=str(tmp_path), split="train")


def test_demo_depth_is_deterministic_and_exact():
    from upbench.data.depth import render_scene

    a = DATASETS.create("demo_depth", split="val", img_size=64, num_images=3)
    b = DATASETS.create("demo_depth", split="val", img_size=64, num_images=3)
    assert torch.equal(a[2]["depth"], b[2]["depth"]) and torch.equal(a[2]["image"], b[2]["image"])
    assert not torch.equal(a[0]["depth"], a[1]["depth"])
    img, depth = render_scene(0, "val", 0, 64)
    assert img.min() >= 0 and img.max() <= 1 and np.isfinite(depth).all()
    assert 1e-3 < depth.min() and depth.max() <= 10.0
    # the bottom rows see the floor: depth = floor height / ray slope grows towards the horizon
    col = depth[:, 0]
    assert col[-1] < col[-8] or col[-1] < 3.0


# ------------------------------------------------------------------------------------------------ end to end
def _depth_cfg(tmp_path, *overrides):
    from upbench.cli import compose
    from upbench.runner import to_container

    return to_container(compose(["task=depth", "backbone=demo", "upsampler=bilinear", f"paths.results={tmp_path}",
                                 "task.probe.epochs=2", "task.probe.cls_token=false", *overrides]))


def test_depth_probe_end_to_end_demo(tmp_path):
    from upbench.runner import run_job

    row = run_job(_depth_cfg(tmp_path, "dataset=demo_depth", "dataset.img_size=64", "dataset.num_images=6",
                             "dataset.limit_val=3"), log=lambda *_: None)
    m = row["metrics"]
    assert row["status"] == "ok" and row["data"]["head_input"] == "features"
    assert 0 <= m["d1"] <= 100 and m["rmse"] > 0 and m["d1"] <= m["d2"] <= m["d3"]
    from upbench import report

    md = report.render([row])
    assert "Depth linear probes" in md and "Demo depth δ1" in md and "Demo depth RMSE" in md


def test_depth_probe_on_real_pseudo_depth_learns(tmp_path):
    """Train on 15 ImageNet images with MiDaS pseudo depth, test on 5 others: better RMSE and delta1 than the best
    constant a probe could learn without looking at the features (the training mean depth)."""
    root = need(DATA / "imagenet_midas_depth25")
    from upbench.runner import run_job

    row = run_job(_depth_cfg(tmp_path, "dataset=depth_folder", f"dataset.root={root}", "dataset.img_size=96",
                             "dataset.train_split='val[:15]'", "dataset.val_split='val[20:]'", "task.probe.epochs=8",
                             "task.probe.sig_warmup_iters=10"), log=lambda *_: None)
    assert row["status"] == "ok" and row["data"]["n_val_scored"] == 5
    ds = DATASETS.create("depth_folder", root=str(root), split="val", img_size=96)
    train = torch.stack([ds[i]["depth"] for i in range(15)])
    const = [depth_metrics(torch.full((96, 96), train[train > 0].mean().item()), ds[i]["depth"]) for i in range(20, 25)]
    assert row["metrics"]["rmse"] < 0.95 * sum(c["rmse"] for c in const) / 5
    assert row["metrics"]["d1"] > sum(c["d1"] for c in const) / 5


def test_cls_token_needs_a_vit_and_seg_rejects_depth_data(tmp_path):
    from upbench.runner import run_job

    with pytest.raises(UpbenchError, match="no CLS token; use task.probe.cls_token=false"):
        run_job(_depth_cfg(tmp_path, "dataset=demo_depth", "dataset.img_size=64", "dataset.num_images=2",
                           "task.probe.cls_token=true"), log=lambda *_: None)
    from upbench.cli import compose
    from upbench.runner import to_container

    cfg = to_container(compose(["task=seg", "backbone=demo", "dataset=demo_depth", "dataset.img_size=64",
                                "dataset.num_images=2", f"paths.results={tmp_path}"]))
    with pytest.raises(UpbenchError, match="task=seg needs a segmentation dataset"):
        run_job(cfg, log=lambda *_: None)


COCO = ASSETS / "data" / "coco2017_subset200"


def _tiny_depth_anything(folder):
    """A random-weight Depth-Anything model of the real architecture (DINOv2 backbone + DPT head), saved locally."""
    pytest.importorskip("transformers", reason="coco_depth pseudo ground truth needs the optional transformers")
    import upbench  # noqa: F401
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_hidden_size=32,
        head_hidden_size=8, depth_estimation_type="relative")).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def test_coco_pseudo_depth_is_computed_once_and_cached(tmp_path):
    """Real COCO images; pseudo ground truth from a Depth-Anything model (tiny, random weights, real layout) is
    written to the cache at the image's size and read back from it without the model."""
    need(COCO)
    model = _tiny_depth_anything(tmp_path / "da")
    cache = tmp_path / "cache"
    ds = DATASETS.create("coco_depth", root=str(COCO), split="val", img_size=56, cache_dir=str(cache),
                         pseudo_model=str(model))
    item = ds[0]
    maps = sorted(cache.glob("*.npy"))
    assert [p.stem for p in maps] == [item["id"]]
    from PIL import Image

    with Image.open(ds.items[0][0]) as img:
        assert np.load(maps[0]).shape == (img.height, img.width)
    assert item["depth"].shape == (56, 56) and torch.isfinite(item["depth"]).all() and item["depth"].max() > 0
    again = DATASETS.create("coco_depth", root=str(COCO), split="val", img_size=56, cache_dir=str(cache),
                            pseudo_model=str(tmp_path / "no_model_needed"))
    assert torch.equal(again[0]["depth"], item["depth"])


def test_coco_pseudo_depth_offline_names_the_model(tmp_path, monkeypatch):
    need(COCO)
    pytest.importorskip("transformers", reason="coco_depth pseudo ground truth needs the optional transformers")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from upbench.data import depth

    depth._depth_anything.cache_clear()
    ds = DATASETS.create("coco_depth", root=str(COCO), split="val", img_size=56, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UpbenchError, match="Depth-Anything-V2-Small-hf.*huggingface-cli download.*cache_dir"):
        ds[0]
