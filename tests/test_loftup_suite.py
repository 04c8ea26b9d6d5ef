"""LoftUp's evaluation suite (Tables 3-4): depth + surface normals with a DPT head (task=dense3d), interactive
segmentation with clicks through the backbone's patch embedding (task=interactive) and ProxyCLIP open-vocabulary
segmentation (task=openvocab): geometry, losses and metrics against hand-computed values, the backbone's additive
patch-token input, the dataset layouts, and one tiny end-to-end run of each task."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS, need
from upbench.data import DATASETS
from upbench.errors import UpbenchError

COCO = ASSETS / "data" / "coco2017_subset200"


def _cfg(tmp_path, *overrides):
    from upbench.cli import compose
    from upbench.runner import to_container

    return to_container(compose(["backbone=demo", "upsampler=bilinear", "upsampler.weights=null",
                                 f"paths.results={tmp_path}", *overrides]))


# ------------------------------------------------------------------------------------------------ dense3d
def _floor(H, f, h=1.0):
    """Depth of the plane Y = h (y down) seen by a pinhole camera with its principal point at the image centre."""
    v = torch.arange(H, dtype=torch.float64)[:, None].expand(H, H) + 0.5 - H / 2
    return torch.where(v > 0, h * f / v.clamp_min(1e-9), torch.zeros_like(v)).float()


def test_normals_from_depth_planes_by_hand():
    from upbench.tasks.dense3d import normals_from_depth

    wall = torch.full((8, 8), 3.0)
    n = normals_from_depth(wall, 5.0)
    assert torch.allclose(n[:, 1:-1, 1:-1], torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 6, 6), atol=1e-6)
    assert n[:, 0].abs().sum() == 0 and n[:, :, -1].abs().sum() == 0     # no neighbours on the border: undefined
    H, f = 16, 10.0
    floor = _floor(H, f)
    centre = normals_from_depth(floor, f, "centre")
    assert torch.allclose(centre[:, 10:15, 2:14], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 5, 12),
                          atol=1e-5)
    # Probe3D's intrinsics have no principal point: the floor tilts by atan((H/2)/f) towards the camera
    corner = normals_from_depth(floor, f, "corner")
    want = torch.tensor([0.0, 1.0, -(H / 2) / f]) / math.hypot(1.0, (H / 2) / f)
    assert torch.allclose(corner[:, 12, 8], want, atol=1e-5)
    assert corner[:, :9].abs().sum() == 0          # rows without depth (and their neighbours) have no normal
    holed = wall.clone()
    holed[4, 4] = 0
    n = normals_from_depth(holed, 5.0)
    defined = (n[:, 3:6, 3:6].abs().sum(0) > 0).int().tolist()
    assert defined == [[1, 0, 1], [0, 0, 0], [1, 0, 1]]    # the hole and its four neighbours have no normal


def test_normal_metrics_by_hand():
    from upbench.tasks.dense3d import normal_metrics

    gt = torch.tensor([0.0, 0.0, 1.0])[None, :, None, None].expand(1, 3, 1, 4).clone()
    angles = [10.0, 20.0, 40.0, 90.0]
    pred = torch.stack([torch.tensor([0.0, math.sin(math.radians(a)), math.cos(math.radians(a))]) for a in angles],
                       -1)[None, :, None, :] * 3.0    # length does not matter
    valid = torch.tensor([[[True, True, True, False]]])  # the 90-degree pixel has no ground truth
    m = normal_metrics(pred, gt, valid)
    assert m["normal_rmse"] == pytest.approx(math.sqrt((100 + 400 + 1600) / 3), abs=1e-6)
    assert m["normal_r11"] == pytest.approx(100 / 3) and m["normal_r22"] == pytest.approx(200 / 3)
    assert m["normal_r30"] == pytest.approx(200 / 3)
    assert normal_metrics(pred, gt, torch.zeros_like(valid)) is None


def test_depth_metrics_scale_invariant_and_warmup_schedule():
    from upbench.tasks._probe import warmup_cosine_factor
    from upbench.tasks.dense3d import depth_metrics_probe3d

    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    pred = 2 * gt + 1                                       # an affine copy: perfect once scale and shift are matched
    si = depth_metrics_probe3d(pred, gt, True)
    assert si["rmse"] == pytest.approx(0.0, abs=1e-9) and si["d1"] == 100
    sa = depth_metrics_probe3d(pred, gt, False)
    assert sa["rmse"] == pytest.approx(math.sqrt((4 + 9 + 25) / 3))  # errors 2, 3, 5 on the three valid pixels
    assert sa["d3"] == 0                                     # ratios 3, 2.5, 2.25 all above 1.25^3 = 1.95
    near = depth_metrics_probe3d(torch.tensor([[1.3, 2.6], [0.8, 5.0]]), gt, False)   # ratios 1.3, 1.3, 5
    assert near["d1"] == 0 and near["d2"] == pytest.approx(200 / 3) and near["d3"] == pytest.approx(200 / 3)
    assert depth_metrics_probe3d(pred, torch.zeros_like(gt), False) is None
    assert warmup_cosine_factor(0, 100, 15) == pytest.approx(0.01)
    assert warmup_cosine_factor(15, 100, 15) == pytest.approx(1.0)
    assert warmup_cosine_factor(100, 100, 15) == pytest.approx(0.01)


def _navi(root, h=20, w=30):
    """A NAVI-layout folder: one object, a multiview scene and the wild set, 16-bit inverse depth."""
    for scene in ("multiview_00_pixel", "wild_set"):
        d = root / "obj" / scene
        (d / "images").mkdir(parents=True)
        (d / "depth").mkdir()
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(d / "images" / "downsampled_000.jpg")
        raw = np.zeros((h, w), np.uint16)
        raw[5:15, 10:20] = 65535 * 10 // 500          # 500 mm -> 0.5 m
        Image.fromarray(raw).save(d / "depth" / "downsampled_000.png")
        (d / "annotations.json").write_text(json.dumps([{"filename": "000.jpg", "image_size": [2 * h, 2 * w],
                                                        "camera": {"focal_length": 80.0}}]))


def test_navi_layout_depth_focal_and_missing(tmp_path):
    _navi(tmp_path / "navi")
    item = DATASETS.create("navi", root=str(tmp_path / "navi"), split="val", img_size=20, every=1)[0]
    assert item["depth"].shape == (20, 20)
    assert item["depth"].max() == pytest.approx(65535 * 10 / 1310 / 1000, rel=1e-6)
    # focal 80 px at 40 px short side -> 40 px on the 20 px image; the object's square (Probe3D: side = last - first
    # index = 9 px) -> 20 px
    assert item["focal_px"] == pytest.approx(40.0 * 20 / 9) and bool((item["depth"] > 0).all())
    with pytest.raises(UpbenchError, match=r"navi: no images found .*multiview_\*,wild_set.*annotations.json"):
        DATASETS.create("navi", root=str(tmp_path / "nothing"), split="train")


def test_dense3d_end_to_end_and_report(tmp_path):
    from upbench import report
    from upbench.runner import run_job

    row = run_job(_cfg(tmp_path, "task=dense3d", "dataset=demo_depth", "dataset.img_size=32", "dataset.num_images=4",
                       "dataset.limit_val=2", "task.head.hidden=8", "task.probe.epochs=1", "task.probe.batch_size=4",
                       "task.probe.warmup_epochs=0.5"),
                  log=lambda *_: None)
    m = row["metrics"]
    assert row["status"] == "ok" and row["data"]["normals_focal"] == ["dataset"]
    assert m["depth_rmse"] > 0 and 0 <= m["depth_si_d1"] <= 100 and 0 <= m["normal_r11"] <= m["normal_r30"] <= 100
    assert m["depth_si_rmse"] <= m["depth_rmse"] + 1e-9   # the least-squares fit can only lower the RMSE
    md = report.render([row])
    assert "Depth and surface normals" in md and "Demo depth depth δ1 (SI)" in md and "normal <30°" in md


# ------------------------------------------------------------------------------------------------ interactive
def test_first_click_is_farthest_from_the_boundary():
    from upbench.tasks.interactive import first_click

    m = np.zeros((9, 11), np.int64)
    m[2:7, 1:10] = 1          # 5 x 9: distance 3 along row 4 for columns 3..7; ties -> the first in row-major order
    assert first_click(m) == (4, 3)
    full = np.ones((5, 5), np.int64)
    assert first_click(full) == (2, 2)    # the image border counts as boundary
    m = np.zeros((6, 6), np.int64)
    m[0:3, 0:6] = 1           # touching three borders: rows -1, 3 and columns -1, 6 are outside -> distance 2 at
    assert first_click(m) == (1, 1)   # row 1, columns 1..4 (without the border rule row 0 would be farthest)
    ignore = np.full((4, 4), 255)
    ignore[1, 1] = 1
    assert first_click(ignore) == (1, 1)


def test_normalized_focal_loss_by_hand():
    from upbench.tasks.interactive import normalized_focal_loss

    assert normalized_focal_loss(torch.zeros(1, 1, 2), torch.tensor([[[1, 0]]])).item() == \
        pytest.approx(-0.5 * math.log(0.5), rel=1e-6)   # beta normalised to 1 per pixel: -alpha log p_t
    logits, target = torch.tensor([[[2.0, -1.0, 5.0]]]), torch.tensor([[[1, 1, 255]]])
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    beta = [(1 - q) ** 2 for q in p]
    mult = 2 / sum(beta)
    want = sum(-0.5 * b * mult * math.log(q) for b, q in zip(beta, p)) / 2
    assert normalized_focal_loss(logits, target).item() == pytest.approx(want, rel=1e-5)


def test_patch_bias_changes_features_and_none_is_bit_identical():
    from upbench.pipeline import build_backbone

    torch.manual_seed(0)
    for cfg in ({"kind": "demo", "name": "demo"},
                {"kind": "timm_vit", "timm_name": "vit_tiny_patch16_224", "name": "t", "pretrained": False,
                 "img_size": 32}):
        bb = build_backbone(cfg)
        x = torch.randn(2, 3, 32, 32)
        plain, _ = bb(x)
        assert torch.equal(plain, bb(x, patch_bias=None)[0])
        bias = torch.zeros(2, bb.embed_channels, 32 // bb.embed_stride, 32 // bb.embed_stride)
        assert torch.equal(plain, bb(x, patch_bias=bias)[0])          # a zero bias adds nothing
        bias[1] = 0.5
        moved, _ = bb(x, patch_bias=bias)
        assert torch.equal(moved[0], plain[0]) and not torch.allclose(moved[1], plain[1])
        assert torch.equal(plain, bb(x)[0])                            # the hook is gone after the call
        with pytest.raises(UpbenchError, match="patch_bias .* does not fit"):
            bb(x, patch_bias=torch.zeros(2, bb.embed_channels, 3, 3))


def test_click_features_bypass_the_feature_cache():
    from upbench.cache import FeatureCache
    from upbench.pipeline import Pipeline, build_backbone, build_upsampler

    bb = build_backbone({"kind": "demo", "name": "demo"})
    up = build_upsampler({"name": "bilinear", "weights": None}, bb, torch.device("cpu"))
    cache = FeatureCache(enabled=True)
    pipe = Pipeline(bb, up, torch.device("cpu"), cache)
    item = {"image": torch.rand(3, 32, 32), "id": "a", "source": "s"}
    cached, _ = pipe.item_features(item)
    entries, lookups = len(cache._memory), cache.hits + cache.misses
    bias = torch.ones(1, bb.embed_channels, 16, 16, requires_grad=True)
    clicked, _ = pipe.encode_with_bias(item["image"][None], bias, grad=True)
    assert not torch.allclose(clicked[0].detach(), cached)
    assert len(cache._memory) == entries and cache.hits + cache.misses == lookups   # the cache was never asked
    assert torch.equal(pipe.item_features(item)[0], cached)           # the cached click-free entry is untouched
    hr = pipe.upsample(item["image"][None], clicked, (32, 32), grad=True)
    hr.sum().backward()                                                # gradients reach the bias through both
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_interactive_layouts_missing_are_one_line(tmp_path):
    with pytest.raises(UpbenchError, match=r"grabcut: no images found .*data_GT/<id>.* \+ boundary_GT/<id>.bmp"):
        DATASETS.create("grabcut", root=str(tmp_path), split="val")
    with pytest.raises(UpbenchError, match="no training split; set dataset.train_root"):
        DATASETS.create("berkeley", root=str(tmp_path), split="train")
    with pytest.raises(UpbenchError, match=r"sbd: no images found .*inst/<id>.mat"):
        DATASETS.create("davis_interactive", root=str(tmp_path), split="train", train_root=str(tmp_path))
    (tmp_path / "data_GT").mkdir()
    (tmp_path / "boundary_GT").mkdir()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "data_GT" / "x.jpg")
    gt = np.zeros((6, 8), np.uint8)
    gt[1:5, 2:6], gt[1, 2] = 255, 128
    Image.fromarray(gt).save(tmp_path / "boundary_GT" / "x.bmp")
    item = DATASETS.create("grabcut", root=str(tmp_path), split="val", img_size=8)[0]
    assert int((item["mask"] == 1).sum()) > 0 and int((item["mask"] == 255).sum()) > 0


def test_interactive_end_to_end_on_real_coco_instances(tmp_path):
    root = need(COCO)
    from upbench import report
    from upbench.runner import run_job

    row = run_job(_cfg(tmp_path, "task=interactive", "dataset=coco_instances", f"dataset.root={root}",
                       "dataset.img_size=32", "dataset.limit_train=4", "dataset.limit_val=3", "task.decoder.hidden=4",
                       "task.probe.epochs=1", "task.probe.batch_size=4"), log=lambda *_: None)
    assert row["status"] == "ok" and row["data"]["features_cached"] is False and row["data"]["n_val_scored"] == 3
    assert 0 <= row["metrics"]["iou1"] <= 100
    assert "Interactive segmentation" in report.render([row]) and "COCO instances IoU@1" in report.render([row])
    with pytest.raises(UpbenchError, match="cannot come from the per-image feature cache"):
        run_job(_cfg(tmp_path, "task=interactive", "dataset=coco_instances", f"dataset.root={root}",
                     "task.cache.features=true"), log=lambda *_: None)


# ------------------------------------------------------------------------------------------------ openvocab
def test_proxy_attention_rows_and_dead_rows():
    from upbench.tasks.openvocab import proxy_attention

    f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]).T.reshape(1, 2, 1, 3)
    a = proxy_attention(f, beta=1.2, gamma=3.0)
    assert torch.allclose(a.sum(-1), torch.ones(1, 3))
    # token 0 ~ token 1, orthogonal to token 2: only similarities above 1.2 x the mean survive
    assert a[0, 0, 2] == 0 and a[0, 2, 0] == 0 and a[0, 0, 1] > 0
    same = torch.ones(1, 2, 1, 3)     # every similarity is 1 < 1.2 x mean: each token keeps only itself
    assert torch.equal(proxy_attention(same), torch.eye(3)[None])


def _tiny_clip(folder):
    """A random CLIP of the real architecture (transformers), with a byte-level tokenizer, saved locally."""
    import upbench  # noqa: F401  (the torchvision fallback before transformers imports it)
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    vocab.update({chr(c) + "</w>": len(cs) + i for i, c in enumerate(cs)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    end = vocab["<|endoftext|>"]
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, bos_token_id=vocab["<|startoftext|>"], eos_token_id=end,
                         pad_token_id=end),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16), projection_dim=24)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_openvocab_offline_fails_in_one_line_and_runs_with_a_local_clip(tmp_path, cli):
    pytest.importorskip("transformers")
    out = cli(["run", "task=openvocab", "dataset=demo", "upsampler=bilinear"], results=tmp_path / "r")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "task.clip_model=/local/folder" in lines[0] and "backbone.weights=/local/file" in lines[0]
    assert "openai/clip-vit-base-patch16" in lines[0]
    from upbench.runner import run_job

    clip = _tiny_clip(tmp_path / "clip")
    rows = [run_job(_cfg(tmp_path, "task=openvocab", "dataset=demo", "dataset.img_size=32", "dataset.num_images=2",
                         "dataset.limit_val=2", f"task.clip_model={clip}", f"upsampler={u}"), log=lambda *_: None)
            for u in ("bilinear", "lowres")]
    assert [r["data"]["proxy_grid"] for r in rows] == [[8, 8], [2, 2]]   # 4 x the 2 x 2 grid; lowres keeps it
    assert all(0 <= r["metrics"]["miou"] <= 100 for r in rows)
    from upbench import report

    assert "Open-vocabulary segmentation (ProxyCLIP)" in report.render(rows)
