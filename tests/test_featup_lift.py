"""FeatUp JBU and LiFT adapters: parameter counts, output sizes, AdaptiveConv, checkpoint loading."""
import pytest
import torch
import torch.nn.functional as F

from upbench import upsamplers
from upbench.errors import UpbenchError
from upbench.upsamplers.featup import FeatUpJBU, adaptive_conv, adaptive_conv_reference
from upbench.upsamplers.lift import LiFT, LiFT2x
from conftest import randomise


# ----------------------------------------------------------------------------- registry / parameter counts
def test_registered():
    assert upsamplers.get("featup") is FeatUpJBU
    assert upsamplers.get("lift") is LiFT
    assert upsamplers.get("lift_2x") is LiFT2x
    assert upsamplers.for_official_method("FeatUp-JBU") is FeatUpJBU
    assert upsamplers.for_official_method("LiFT") is LiFT
    assert upsamplers.for_official_method("LiFT-loftup14") is LiFT


def test_featup_param_count():
    assert FeatUpJBU(384).num_params == 172_772
    assert FeatUpJBU(384, use_norm=True).num_params == 172_772 + 768
    keys = set(FeatUpJBU(384).state_dict())
    for k in ("up1.range_temp", "up1.sigma_spatial", "up1.range_proj.0.weight", "up1.range_proj.3.bias",
              "up4.fixup_proj.0.weight", "up4.fixup_proj.3.bias", "fixup_proj.1.weight", "fixup_proj.1.bias"):
        assert k in keys
    assert len(keys) == 42


@pytest.mark.parametrize("patch", [8, 14, 16])
def test_lift_param_count(patch):
    m = LiFT(384, patch)
    assert m.num_params == 1_187_280
    assert m.variant == ("loftup14" if patch == 14 else "official")
    assert len(m.state_dict()) == 37
    assert tuple(m.state_dict()["up1.up.weight"].shape) == (416, 208, 2, 2)
    assert tuple(m.state_dict()["up1.conv_1.double_conv.0.weight"].shape) == (192, 240, 3, 3)


# ----------------------------------------------------------------------------- AdaptiveConv
@pytest.mark.parametrize("shape", [(1, 8, 12, 12), (2, 5, 9, 14), (1, 3, 1, 7)])
@pytest.mark.parametrize("block_rows", [None, 1, 4, 1000])
def test_adaptive_conv_matches_unfold_einsum(shape, block_rows):
    g = torch.Generator().manual_seed(1)
    b, c, h, w = shape
    padded = torch.randn(b, c, h + 6, w + 6, generator=g)
    kernel = torch.softmax(torch.randn(b, 49, h, w, generator=g), 1) + 0.1 * torch.randn(b, 49, h, w, generator=g)
    ref = adaptive_conv_reference(padded, kernel)
    got = adaptive_conv(padded, kernel, block_rows=block_rows)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_adaptive_conv_explicit_definition():
    """out[b,c,y,x] = sum_{i,j} padded[b,c,y+i,x+j] * K[b,y,x,i,j], K = kernel.permute(0,2,3,1).reshape(B,H,W,d,d)."""
    g = torch.Generator().manual_seed(2)
    padded = torch.randn(1, 2, 5 + 2, 4 + 2, generator=g, dtype=torch.float64)
    kernel = torch.randn(1, 9, 5, 4, generator=g, dtype=torch.float64)
    k = kernel.permute(0, 2, 3, 1).reshape(1, 5, 4, 3, 3)
    ref = torch.zeros(1, 2, 5, 4, dtype=torch.float64)
    for y in range(5):
        for x in range(4):
            ref[0, :, y, x] = (padded[0, :, y:y + 3, x:x + 3] * k[0, y, x]).sum((-1, -2))
    assert torch.allclose(adaptive_conv(padded, kernel), ref, atol=1e-12)


# ----------------------------------------------------------------------------- output sizes
FEATUP_CASES = [  # (batch, image HW, feature hw, output HW)
    (1, (32, 32), (4, 4), (32, 32)),
    (1, (40, 56), (3, 4), (37, 61)),
    (2, (28, 28), (2, 2), (28, 28)),
    (1, (16, 16), (2, 3), (50, 70)),  # output larger than the image and than 16x
]


@pytest.mark.parametrize("b,img,feat,out", FEATUP_CASES)
@pytest.mark.parametrize("use_norm", [False, True])
def test_featup_output_size(b, img, feat, out, use_norm):
    m = randomise(FeatUpJBU(8, use_norm=use_norm))
    with torch.no_grad():
        y = m(torch.randn(b, 3, *img), torch.randn(b, 8, *feat), out)
    assert y.shape == (b, 8, *out)
    assert torch.isfinite(y).all()


def test_featup_forward_is_official_stack_plus_resize():
    m = randomise(FeatUpJBU(6), seed=3)
    img, f = torch.randn(1, 3, 30, 30), torch.randn(1, 6, 3, 2)
    with torch.no_grad():
        off = m.run_official("FeatUp-JBU", {"features": f, "image": img}, {})
        y16 = m(img, f, (48, 32))
        y = m(img, f, (30, 20))
    assert [tuple(off[k].shape[-2:]) for k in m.stage_names] == [(6, 4), (12, 8), (24, 16), (48, 32)]
    assert torch.equal(y16, off["output"])
    ref = F.interpolate(off["output"], size=(30, 20), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(y, ref, atol=1e-6)


def test_featup_batch_independent():
    m = randomise(FeatUpJBU(4, use_norm=True), seed=4)
    img, f = torch.randn(2, 3, 24, 24), torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        both = m(img, f, (24, 24))
        one = m(img[1:], f[1:], (24, 24))
    assert torch.allclose(both[1:], one, atol=1e-5)


LIFT_CASES = [  # (patch, batch, image HW, feature hw, output HW)
    (16, 1, (64, 64), (4, 4), (64, 64)),
    (16, 2, (50, 70), (3, 4), (45, 61)),  # image not patch x grid: resized for the first call
    (8, 1, (32, 48), (4, 6), (32, 48)),
    (8, 2, (24, 24), (3, 3), (100, 90)),  # output larger than the image
    (14, 1, (56, 56), (4, 4), (56, 56)),
    (14, 2, (42, 56), (3, 4), (30, 41)),
    (14, 1, (20, 20), (4, 4), (70, 70)),  # output larger than the image
]


@pytest.mark.parametrize("patch,b,img,feat,out", LIFT_CASES)
@pytest.mark.parametrize("cls", [LiFT, LiFT2x])
def test_lift_output_size(cls, patch, b, img, feat, out):
    m = randomise(cls(8, patch))
    with torch.no_grad():
        y = m(torch.randn(b, 3, *img), torch.randn(b, 8, *feat), out)
    assert y.shape == (b, 8, *out)
    assert torch.isfinite(y).all()


def test_lift_iteration_count():
    assert LiFT.doublings((32, 32), (448, 448)) == 4
    assert LiFT.doublings((32, 32), (512, 512)) == 4
    assert LiFT.doublings((32, 32), (513, 100)) == 5
    assert LiFT.doublings((4, 8), (16, 16)) == 2
    assert LiFT.doublings((8, 8), (8, 8)) == 1


@pytest.mark.parametrize("patch", [14, 16])
def test_lift_forward_matches_official_iteration(patch):
    m = randomise(LiFT(8, patch), seed=5)
    img, f = torch.randn(1, 3, 4 * patch, 3 * patch), torch.randn(1, 8, 4, 3)
    method = "LiFT-loftup14" if patch == 14 else "LiFT"
    if method == "LiFT":
        inputs = {"image": img, "features": f.flatten(2).transpose(1, 2)}
        ctor = {"iters": 2, "pre_shape": True, "post_shape": True}
    else:
        inputs = {"image": img, "features": f}
        ctor = {"iters": 2}
    with torch.no_grad():
        off = m.run_official(method, inputs, ctor)
        y = m(img, f, (16, 12))
        y2 = LiFT2x(8, patch).eval()
        y2.load_state_dict(m.state_dict())
        z = y2(img, f, (8, 6))
    out = off["output"]
    if method == "LiFT":
        out = out.transpose(1, 2).reshape(1, 8, 16, 12)
        first = off["lift_1"].transpose(1, 2).reshape(1, 8, 8, 6)
    else:
        first = off["lift_1"]
    assert torch.equal(y, out)
    assert torch.equal(z, first)


# ----------------------------------------------------------------------------- checkpoint loading
def test_featup_lightning_checkpoint(tmp_path):
    src = randomise(FeatUpJBU(8, use_norm=True), seed=6)
    sd = {}
    for k, v in src.state_dict().items():
        sd[("model.1." + k) if k.startswith("norm.") else ("upsampler." + k)] = v.clone()
    sd["model.0.model.patch_embed.weight"] = torch.randn(8, 3, 2, 2)
    sd["scale_net.net.weight"] = torch.randn(1, 8, 1, 1)
    sd["downsampler.kernel"] = torch.randn(3, 3)
    path = tmp_path / "dinov2_jbu_stack_cocostuff.ckpt"
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 10}, path)

    m = FeatUpJBU(8, use_norm=True).load_official(str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    img, f = torch.randn(1, 3, 16, 16), torch.randn(1, 8, 2, 2)
    with torch.no_grad():
        assert torch.equal(m.eval()(img, f, (16, 16)), src(img, f, (16, 16)))

    with pytest.raises(UpbenchError, match="use_norm"):
        FeatUpJBU(8, use_norm=False).load_official(str(path))


def test_featup_mismatched_checkpoint(tmp_path):
    sd = {"upsampler." + k: v for k, v in FeatUpJBU(8).state_dict().items() if k != "up3.range_temp"}
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(UpbenchError, match=r"up3\.range_temp"):
        FeatUpJBU(8).load_official(str(path))
    with pytest.raises(UpbenchError, match=r"fixup_proj\.1\.weight"):
        FeatUpJBU(16).load_official(str(path))  # C=8 file into C=16 model: shape mismatch named


def test_featup_sources():
    src = FeatUpJBU.pretrained_sources
    for name in ("vit", "dino16", "clip", "dinov2", "resnet50"):
        assert src[name].url.endswith(f"/pretrained/{name}_jbu_stack_cocostuff.ckpt")
        assert src[name + "_no_norm"].url.endswith(f"/pretrained/no_norm/{name}_jbu_stack_cocostuff.ckpt")
    assert src["maskclip_no_norm"].url.endswith("/no_norm/maskclip_jbu_stack_cocostuff.ckpt")
    assert all("MIT" in s.licence for s in src.values())


def test_lift_module_prefix_checkpoint(tmp_path):
    src = randomise(LiFT(8, 16), seed=7)
    path = tmp_path / "lift_dino_vits16.pth"
    torch.save({"module." + k: v.clone() for k, v in src.state_dict().items()}, path)
    m = LiFT(8, 16).load_official(str(path)).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    img, f = torch.randn(1, 3, 64, 64), torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(m(img, f, (32, 32)), src(img, f, (32, 32)))


def test_lift_mismatched_checkpoint(tmp_path):
    sd = {k: v for k, v in LiFT(8, 16).state_dict().items() if k != "outc.bias"}
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UpbenchError, match=r"outc\.bias") as err:
        LiFT(8, 16).load_official(str(path))
    assert "extra.weight" in str(err.value)
    torch.save(LiFT(8, 16).state_dict(), path)
    with pytest.raises(UpbenchError, match=r"up1\.up\.weight"):
        LiFT(16, 16).load_official(str(path))


def test_lift_release_needs_manual_download():
    assert set(LiFT.pretrained_sources) == {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"}
    with pytest.raises(UpbenchError, match="Google Drive") as err:
        LiFT(384, 16).load_official("dino_vits16")
    assert "lift_dino_vits16.pth" in str(err.value)
    with pytest.raises(UpbenchError, match="known names"):
        LiFT(384, 16).load_official("no_such_name")


def test_lift_variant_errors():
    with pytest.raises(UpbenchError):
        LiFT(8, 14, variant="official")
    with pytest.raises(UpbenchError):
        LiFT(8, 16, variant="nope")
    assert LiFT(8, 16, variant="loftup14").variant == "loftup14"
