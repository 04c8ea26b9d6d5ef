"""The training-free baselines: JBF (NAF's joint bilateral filter), the guided filter, bicubic.  Parity of JBF with
the official code is in test_golden.py; here each filter is checked against its definition and by hand."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from upbench import upsamplers
from upbench.errors import UpbenchError
from upbench.upsamplers.classical import Bicubic, GuidedFilter, JointBilateralFilter, box_mean, guided_filter

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_registered_with_family_and_licence():
    assert upsamplers.get("jbf") is JointBilateralFilter
    assert upsamplers.for_official_method("JBF") is JointBilateralFilter
    assert upsamplers.get("guided_filter") is GuidedFilter and upsamplers.get("bicubic") is Bicubic
    for name, family in (("jbf", "classical"), ("guided_filter", "classical"), ("bicubic", "interpolation")):
        cls = upsamplers.get(name)
        assert cls.family == family and cls.parameter_free and cls.licence
        assert upsamplers.create(name, in_channels=384).num_params == 0


def test_list_shows_the_licences(cli):
    out = cli(["list"])
    assert out.returncode == 0
    section = out.stdout.split("upsampler licences", 1)[1].splitlines()[1:]
    section = section[:next(i for i, line in enumerate(section) if not line.startswith("  "))]
    lines = {line.split()[0]: line for line in section}
    assert set(lines) == set(upsamplers.available())
    assert "Apache-2.0" in lines["naf"] and "valeoai/NAF" in lines["naf"] and "weights Apache-2.0" in lines["naf"]
    assert "Apache-2.0" in lines["jbf"] and "MIT" in lines["guided_filter"] and "BSD-3-Clause" in lines["bicubic"]
    assert "weights CC-BY-4.0" in lines["anyup"]


# ------------------------------------------------------------------------------------------------------------ JBF
def jbf_by_loops(signal, guidance, k, sigma_color, sigma_spatial):
    """The filter written out pixel by pixel (float64): reflect borders, L1 colour distance over the channels."""
    pad = k // 2
    sp = F.pad(signal, (pad,) * 4, mode="reflect")
    gp = F.pad(guidance, (pad,) * 4, mode="reflect")
    offsets = torch.arange(k, dtype=torch.float64) - pad
    g1 = torch.exp(-offsets ** 2 / (2 * sigma_spatial ** 2))
    g1 = g1 / g1.sum()
    out = torch.empty_like(signal)
    for y in range(signal.shape[-2]):
        for x in range(signal.shape[-1]):
            dist = (gp[:, :, y:y + k, x:x + k] - guidance[:, :, y:y + 1, x:x + 1]).abs().sum(1)   # (B, k, k)
            weight = g1[:, None] * g1[None, :] * torch.exp(-0.5 * dist ** 2 / sigma_color ** 2)
            window = sp[:, :, y:y + k, x:x + k]
            out[:, :, y, x] = (window * weight[:, None]).sum((-1, -2)) / weight.sum((-1, -2))[:, None]
    return out


def test_jbf_is_its_definition():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 20, 28, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    model = JointBilateralFilter(kernel_size=3, sigma_color=0.3, sigma_spatial=1.0)
    got = model(image, feats, (17, 23))
    signal = F.interpolate(feats, size=(12, 16), mode="bilinear", align_corners=False)
    guidance = F.interpolate(image, size=(12, 16), mode="bilinear", align_corners=False)
    ref = F.interpolate(jbf_by_loops(signal, guidance, 3, 0.3, 1.0), size=(17, 23), mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert model.native_output_size((3, 4), (17, 23)) == (12, 16)


def test_jbf_limits():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
    feats = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    flat = torch.full((1, 4, 4, 4), 0.7, dtype=torch.float64)
    assert torch.allclose(JointBilateralFilter()(image, flat, (32, 32)), flat.new_full((1, 4, 32, 32), 0.7))
    # an infinitely tolerant colour kernel leaves the spatial Gaussian blur of the x4 bilinear features
    blur = JointBilateralFilter(sigma_color=1e12)(image, feats, (16, 16))
    taps = torch.exp(-(torch.arange(5, dtype=torch.float64) - 2) ** 2 / (2 * 1.5 ** 2))
    taps = taps / taps.sum()
    signal = F.pad(F.interpolate(feats, scale_factor=4, mode="bilinear", align_corners=False), (2,) * 4, mode="reflect")
    ref = F.conv2d(signal, (taps[:, None] * taps[None, :]).expand(4, 1, 5, 5), groups=4)
    torch.testing.assert_close(blur, ref, atol=1e-12, rtol=1e-12)


def test_jbf_channel_chunks_do_not_change_the_output(monkeypatch):
    import upbench.upsamplers.classical as classical

    image, feats = torch.randn(1, 3, 40, 40), torch.randn(1, 9, 5, 5)
    whole = JointBilateralFilter()(image, feats, (40, 40))
    monkeypatch.setattr(classical, "_CPU_CHUNK_ELEMENTS", 1)   # one channel at a time
    assert torch.equal(JointBilateralFilter()(image, feats, (40, 40)), whole)


def test_jbf_bad_arguments():
    with pytest.raises(UpbenchError, match="kernel_size must be odd"):
        upsamplers.create("jbf", kernel_size=4)
    with pytest.raises(UpbenchError, match="must be positive"):
        upsamplers.create("jbf", sigma_color=0)
    with pytest.raises(UpbenchError, match="unsupported official constructor arguments"):
        JointBilateralFilter.from_official("JBF", {"kernel_size": 5, "sigma_range": 0.1})


# ---------------------------------------------------------------------------------------------------- guided filter
def grey_image(values, size):
    """A normalised (ImageNet) image whose R = G = B = ``values`` (luma = the values)."""
    v = torch.tensor(values, dtype=torch.float64).reshape(1, 1, *size).expand(1, 3, *size)
    mean, std = (torch.tensor(t, dtype=torch.float64).view(1, 3, 1, 1) for t in IMAGENET)
    return (v - mean) / std


def test_guided_filter_by_hand():
    """One row I = [0, 0, 1, 1], p = [1, 1, 3, 3], r = 1, eps = 2/9, windows clipped at the borders:
    mean I = [0, 1/3, 2/3, 1], var I = [0, 2/9, 2/9, 0], cov = [0, 4/9, 4/9, 0] -> a = [0, 1, 1, 0],
    b = [1, 4/3, 5/3, 3] -> q = mean(a) I + mean(b) = [7/6, 4/3, 8/3, 17/6]."""
    image = grey_image([0.0, 0.0, 1.0, 1.0], (1, 4))
    feats = torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64).view(1, 1, 1, 4)   # at the output size already
    got = GuidedFilter(radius=1, eps=2 / 9)(image, feats, (1, 4))
    expected = [Fraction(7, 6), Fraction(4, 3), Fraction(8, 3), Fraction(17, 6)]
    torch.testing.assert_close(got.view(-1), torch.tensor([float(e) for e in expected], dtype=torch.float64),
                               atol=1e-7, rtol=0)   # the luma weights sum to 1 within float rounding


def test_guided_filter_limits():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 30, 26, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64)
    bilinear = F.interpolate(feats, size=(30, 26), mode="bilinear", align_corners=False)
    flat = torch.full((2, 6, 5, 4), -1.25, dtype=torch.float64)
    torch.testing.assert_close(GuidedFilter()(image, flat, (30, 26)), flat.new_full((2, 6, 30, 26), -1.25))
    # eps -> infinity: a = 0, b = mean(p): the twice box-smoothed bilinear features
    smooth = GuidedFilter(radius=3, eps=1e15)(image, feats, (30, 26))
    once = F.avg_pool2d(bilinear, 7, stride=1, padding=3, count_include_pad=False)
    torch.testing.assert_close(smooth, F.avg_pool2d(once, 7, stride=1, padding=3, count_include_pad=False),
                               atol=1e-9, rtol=0)
    # radius 0: every window is one pixel, a = 0, b = p: bilinear itself
    torch.testing.assert_close(GuidedFilter(radius=0)(image, feats, (30, 26)), bilinear, atol=1e-12, rtol=0)


def test_guided_filter_keeps_an_edge_that_bilinear_blurs():
    """A vertical edge in the image and features that change across it: the filtered features follow the edge."""
    values = [[0.0] * 16 + [1.0] * 16 for _ in range(32)]
    image = grey_image(values, (32, 32))
    feats = torch.tensor([[0.0] * 4 + [1.0] * 4] * 8, dtype=torch.float64).view(1, 1, 8, 8)
    bilinear = F.interpolate(feats, size=(32, 32), mode="bilinear", align_corners=False)
    guided = GuidedFilter()(image, feats, (32, 32))   # defaults: radius 8, eps 1e-2
    target = torch.tensor(values, dtype=torch.float64)
    assert (guided[0, 0] - target).abs().max() < 0.5 * (bilinear[0, 0] - target).abs().max()
    assert (guided[0, 0, :, 16] - guided[0, 0, :, 15]).min() > 0.7 > 0.3 > (bilinear[0, 0, :, 16] -
                                                                           bilinear[0, 0, :, 15]).max()


def test_box_mean_clips_windows_at_the_borders():
    x = torch.arange(5, dtype=torch.float64).view(1, 1, 1, 5)
    assert box_mean(x, 1).view(-1).tolist() == [0.5, 1.0, 2.0, 3.0, 3.5]
    assert torch.equal(box_mean(x, 0), x)


def test_guided_filter_channel_chunks_do_not_change_the_output(monkeypatch):
    import upbench.upsamplers.classical as classical

    guide, signal = torch.rand(1, 1, 24, 24), torch.randn(1, 7, 24, 24)
    whole = guided_filter(guide, signal, 2, 1e-2)
    monkeypatch.setattr(classical, "_CPU_CHUNK_ELEMENTS", 1)
    assert torch.equal(guided_filter(guide, signal, 2, 1e-2), whole)


def test_guided_filter_bad_arguments():
    with pytest.raises(UpbenchError, match="radius must be a whole number"):
        upsamplers.create("guided_filter", radius=1.5)
    with pytest.raises(UpbenchError, match="eps must be positive"):
        upsamplers.create("guided_filter", eps=0)


# --------------------------------------------------------------------------------------------------------- bicubic
def test_bicubic_is_torch_bicubic():
    image, feats = torch.randn(2, 3, 30, 40), torch.randn(2, 5, 3, 4)
    got = upsamplers.create("bicubic")(image, feats, (30, 40))
    assert torch.equal(got, F.interpolate(feats, size=(30, 40), mode="bicubic", align_corners=False))
    assert not torch.allclose(got, F.interpolate(feats, size=(30, 40), mode="bilinear", align_corners=False))
