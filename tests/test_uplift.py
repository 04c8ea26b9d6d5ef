"""UPLiFT: structure, parameter counts, attender equivalences, output sizes, checkpoints.
(Parity with the official code is checked by test_golden.py on the UPLiFT golden cases.)"""
import json

import pytest
import torch
import torch.nn.functional as F

from upbench import upsamplers
from conftest import randomise, GOLDEN
from upbench.errors import UpbenchError
from upbench.upsamplers.uplift import (ATTENDER_OFFSETS, UPLiFT, UPLiFTVAE, attender_offsets, attender_padding,
                               load_config, local_attend_fast, local_attend_reference, residual_auto)

torch.manual_seed(0)

# a small VAE-style config (LayerNorm, count 2, noise channels, refiner) to keep the tests fast
SMALL_VAE_CFG = {
    "up_factor": 2, "attender": 17, "enc_share": True,
    "encoder": {"down_steps": 4, **{f"block_{k}": {"block": "SingleConv", "norm": "layer", "count": 2,
                                                    "hc": [w, w]} for k, w in enumerate([8, 8, 16, 16, 16])},
                **{f"down_{k}": {"down_op": "none", "factor": 1.0, "residual": "none"} for k in range(1, 5)}},
    "decoder": {"up_steps": 1, "ncat_c": 4, "ncat_s": 0, "enc_resample": "nearest",
                "block_0": {"block": "SingleConv", "norm": "layer", "count": 1, "hc": [16]},
                "up_1": {"up_op": "tconv", "factor": 2, "residual": "bilinear"},
                "block_1": {"block": "SingleConv", "norm": "layer", "count": 2, "hc": [16, 16]}},
    "refiner": {"enc_resample": "nearest", "ncat_c": 4, "ncat_s": 0, "ref_con": -1,
                "block_0": {"block": "SingleConv", "norm": "layer", "count": 2, "hc": [16, 16]}},
}


@pytest.fixture(scope="module")
def small_dino():
    return randomise(UPLiFT(in_channels=16, patch_size=14))


# --------------------------------------------------------------------------------------------- structure
def test_param_count_dinov2_s14():
    m = UPLiFT(in_channels=384, patch_size=14)
    assert m.arch_name == "uplift_dinov2-s14"
    assert m.num_params == 789_521
    assert sum(p.numel() for p in m.encoder.parameters()) == 283_904
    assert sum(p.numel() for p in m.decoder.parameters()) == 504_512
    assert sum(p.numel() for p in m.attender.parameters()) == 1_105


def test_param_count_dinov3_same_keys():
    m2, m3 = UPLiFT(384, 14), UPLiFT(384, 16)
    assert m3.arch_name == "uplift_dinov3-splus16"
    assert m3.num_params == 789_521
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m3.state_dict().items()}


def test_param_count_sd15_vae():
    m = UPLiFTVAE()
    assert m.num_params == 53_487_445
    assert m.in_channels == 4 and m.patch_size == 8
    assert "refiner.blocks.11.conv.3.weight" in m.state_dict() and "ref_outc.weight" in m.state_dict()


def test_state_dict_keys_match_official_listing():
    listing = GOLDEN / "params" / "uplift_dinov2-s14_c384.json"
    if not listing.is_file():
        pytest.skip(f"no official key listing at {listing}")
    ref = json.loads(listing.read_text())
    sd = UPLiFT(384, 14).state_dict()
    assert list(sd) == [e["key"] for e in ref["state_dict"]]
    assert all(tuple(sd[e["key"]].shape) == tuple(e["shape"]) for e in ref["state_dict"])


def test_config_sources():
    by_name = load_config("uplift_dinov2-s14")
    assert by_name["backbone"]["patch"] == 14 and by_name["uplift"]["attender"] == 17
    section_only = load_config(by_name["uplift"])
    assert section_only["uplift"] == by_name["uplift"]
    with pytest.raises(UpbenchError, match="unknown arch"):
        load_config("uplift_no_such_config")


def test_residual_auto():
    a, b = torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2)
    out = residual_auto(a, b)
    assert torch.equal(out[:, :3], b[:, :3] + a) and torch.equal(out[:, 3:], b[:, 3:])
    out = residual_auto(b, a)
    assert torch.equal(out, a + b[:, :3])


# --------------------------------------------------------------------------------------------- attender
def test_offset_tables():
    assert ATTENDER_OFFSETS[17] == ((-2, -2), (-2, 0), (-2, 2), (-1, -1), (-1, 0), (-1, 1), (0, -2), (0, -1),
                                    (0, 0), (0, 1), (0, 2), (1, -1), (1, 0), (1, 1), (2, -2), (2, 0), (2, 2))
    assert ATTENDER_OFFSETS[5] == ((-1, 0), (0, -1), (0, 0), (0, 1), (1, 0))
    assert ATTENDER_OFFSETS[9] == tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert ATTENDER_OFFSETS[25] == tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3))
    assert ATTENDER_OFFSETS[13] == tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                                         if abs(dy) + abs(dx) <= 2)
    for n, offs in ATTENDER_OFFSETS.items():
        assert len(offs) == n == len(set(offs))
        assert list(offs) == sorted(offs)  # row-major: dy then dx ascending
    # the 17-star = 3x3 at dilation 1 united with 3x3 at dilation 2
    star = {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} | {(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)}
    assert set(ATTENDER_OFFSETS[17]) == star
    assert [attender_padding(n) for n in (5, 9, 13, 17, 25)] == [1, 1, 2, 2, 2]
    with pytest.raises(UpbenchError):
        attender_offsets(7)


@pytest.mark.parametrize("n", [5, 9, 13, 17, 25])
@pytest.mark.parametrize("shape", [(2, 7, 5, 6, 2, 2), (1, 3, 4, 3, 3, 2), (1, 33, 2, 1, 2, 2)])
def test_fast_attender_matches_reference(n, shape):
    B, C, h, w, I, J = shape
    x = torch.randn(B, C, h, w)
    attn = torch.softmax(torch.randn(B, n, h * I, w * J) * 2, dim=1)
    offs = ATTENDER_OFFSETS[n]
    ref = local_attend_reference(x, attn, offs)
    a_last = attn.permute(0, 2, 3, 1).contiguous()
    for chunk in (1, 1 << 22):  # one low-res row per block, and everything at once
        got = local_attend_fast(x.contiguous(memory_format=torch.channels_last), a_last, offs, chunk_elems=chunk)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < 1e-5
    # with the resize folded in: down, up, one axis only, down to a single pixel, and to width 1 (where PyTorch's
    # resize of a contiguous map is not separable; the reference sees a contiguous map)
    H, W = h * I, w * J
    for size in [(max(1, H - 3), max(1, W - 1)), (H + 5, 2 * W + 1), (H, W + 2), (1, 1), (H + 3, 1)]:
        want = F.interpolate(ref, size=size, mode="bilinear", align_corners=False, antialias=True)
        got = local_attend_fast(x, a_last, offs, size=size)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-5
    # replication padding == clamping the neighbour indices at the border
    ys = torch.arange(h * I) // I
    xs = torch.arange(w * J) // J
    manual = torch.zeros_like(ref)
    for d, (dy, dx) in enumerate(offs):
        ry, rx = (ys + dy).clamp(0, h - 1), (xs + dx).clamp(0, w - 1)
        manual += attn[:, d:d + 1] * x[:, :, ry][:, :, :, rx]
    assert (manual - ref).abs().max().item() < 1e-5


def test_model_fast_path_matches_reference(small_dino):
    img, feats = torch.randn(2, 3, 56, 42), torch.randn(2, 16, 4, 3)
    m = small_dino
    assert m._enc_last_stride((64, 48), (4, 3), 4) == 2  # the strided last encoder block is exercised
    with torch.no_grad():
        m.fast = True
        fast = m.forward_steps(img, feats, 4)
        m.fast = False
        ref = m.forward_steps(img, feats, 4)
        m.fast = True
    for f, r in zip(fast, ref):
        assert f.shape == r.shape
        assert (f - r).abs().max().item() < 1e-4


def test_vae_style_fast_path_matches_reference():
    m = randomise(UPLiFTVAE(arch=SMALL_VAE_CFG))
    img, lat = torch.rand(1, 3, 32, 24), torch.randn(1, 4, 4, 3)
    with torch.no_grad():
        fast = m.forward_steps(img, lat, 2)
        m.fast = False
        ref = m.forward_steps(img, lat, 2)
    for f, r in zip(fast, ref):
        assert (f - r).abs().max().item() < 1e-4


def _fast_and_reference(m, *args, iters=None, call=None):
    """(fast-path output, reference-path output) of ``m(*args)`` (or ``call(m)``), eval mode, ``iters`` fixed."""
    saved = m.fast, m.iters
    m.iters = iters
    try:
        with torch.inference_mode():
            m.fast = True
            fast = call(m) if call else m(*args)
            m.fast = False
            ref = call(m) if call else m(*args)
    finally:
        m.fast, m.iters = saved
    return fast, ref


def _assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=tol, rtol=tol), f"max abs err {(got - want).abs().max().item():.3e}"


def test_fast_path_fused_downscale_resize(small_dino):
    """The last attender step with the antialiased resize folded in: 6x7 features, native 96x112, output 84x98."""
    img, feats = torch.randn(1, 3, 84, 98), torch.randn(1, 16, 6, 7)
    fast, ref = _fast_and_reference(small_dino, img, feats, (84, 98))
    assert fast.shape == (1, 16, 84, 98)
    _assert_close(fast, ref)
    # output sizes unrelated to the native one (anisotropic, odd, a single column)
    for size in [(61, 101), (30, 1)]:
        fast, ref = _fast_and_reference(small_dino, img, feats, size)
        _assert_close(fast, ref)


def test_fast_path_fused_upscale_resize(small_dino):
    """Output larger than the native map: 3 steps give 48x56, resized up to 84x98 (and 100x57: up and down)."""
    img, feats = torch.randn(1, 3, 84, 98), torch.randn(1, 16, 6, 7)
    for size in [(84, 98), (100, 57)]:
        fast, ref = _fast_and_reference(small_dino, img, feats, size, iters=3)
        _assert_close(fast, ref)


def test_fast_path_batch2_and_official_outsize(small_dino):
    img, feats = torch.randn(2, 3, 56, 70), torch.randn(2, 16, 4, 5)
    fast, ref = _fast_and_reference(small_dino, img, feats, (50, 73))
    _assert_close(fast, ref)
    assert not torch.allclose(fast[0], fast[1])
    # the official call with ``outsize`` takes the same fused route
    fast, ref = _fast_and_reference(small_dino, iters=2,
                                    call=lambda m: m.forward_official(img, feats, outsize=[37, 45]))
    _assert_close(fast, ref)
    # no resize needed: the native map itself
    fast, ref = _fast_and_reference(small_dino, img, feats, (64, 80))
    _assert_close(fast, ref)


def test_vae_style_fast_path_with_resize():
    """With a refiner the resize follows it (not fused); batch 2, non-square."""
    m = randomise(UPLiFTVAE(arch=SMALL_VAE_CFG))
    img, lat = torch.rand(2, 3, 32, 24), torch.randn(2, 4, 4, 3)
    fast, ref = _fast_and_reference(m, img, lat, (29, 21))
    _assert_close(fast, ref)


def test_bfloat16_compute_option():
    """``compute_dtype="bfloat16"``: encoder / decoder in bf16, attender and output in float32.  Loose tolerance
    against the float32 reference: relative L2 error below 2e-2 and max abs error below 5% of the output's range
    (measured here: about 4e-3 and 0.7%)."""
    m = randomise(UPLiFT(in_channels=16, patch_size=14, compute_dtype="bfloat16"))
    assert m.compute_dtype == torch.bfloat16 and m.param_dtype == torch.float32
    img, feats = torch.randn(2, 3, 84, 98), torch.randn(2, 16, 6, 7)
    with torch.inference_mode():
        got = m(img, feats, (84, 98))
        m.fast = False  # the reference path ignores compute_dtype
        ref = m(img, feats, (84, 98))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = got - ref
    assert (err.norm() / ref.norm()).item() < 2e-2
    assert err.abs().max().item() < 0.05 * (ref.max() - ref.min()).item()
    assert not torch.equal(got, ref)  # really computed in reduced precision
    # LayerNorm blocks, noise channels and the refiner (whose output is the step's output: rel. L2 below 5e-2)
    v = randomise(UPLiFTVAE(arch=SMALL_VAE_CFG, compute_dtype="bf16"))
    img, lat = torch.rand(2, 3, 32, 24), torch.randn(2, 4, 4, 3)
    with torch.inference_mode():
        got = v(img, lat, (29, 21))
        v.fast = False
        ref = v(img, lat, (29, 21))
    assert got.dtype == torch.float32 and ((got - ref).norm() / ref.norm()).item() < 5e-2


def test_output_is_convex_combination(small_dino):
    img, feats = torch.randn(1, 3, 56, 56), torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        steps = small_dino.forward_steps(img, feats, 2)
    offs = ATTENDER_OFFSETS[17]
    prev = feats
    for y in steps:
        h, w = prev.shape[-2:]
        H, W = y.shape[-2:]
        p = attender_padding(17)
        xp = F.pad(prev, (p,) * 4, mode="replicate")
        nb = torch.stack([xp[:, :, p + dy:p + dy + h, p + dx:p + dx + w] for dy, dx in offs], 1)
        lo = nb.min(1).values.repeat_interleave(H // h, -2).repeat_interleave(W // w, -1)
        hi = nb.max(1).values.repeat_interleave(H // h, -2).repeat_interleave(W // w, -1)
        assert bool((y >= lo - 1e-5).all()) and bool((y <= hi + 1e-5).all())
        prev = y


# --------------------------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("patch,img_size,feat_size,batch,out_size", [
    (14, (56, 56), (4, 4), 1, (56, 56)),        # pixel-dense patch 14: 16x then resize
    (14, (42, 70), (3, 5), 2, (42, 70)),        # non-square, batch 2
    (14, (57, 61), (4, 4), 1, (57, 61)),        # image not a multiple of the patch
    (14, (56, 56), (4, 4), 1, (100, 130)),      # output larger than the image
    (14, (56, 56), (4, 4), 1, (6, 5)),          # less than 2x
    (16, (64, 48), (4, 3), 2, (64, 48)),        # patch 16: exact 16x, no resize
    (16, (64, 64), (4, 4), 1, (24, 40)),        # anisotropic output
    (16, (30, 50), (2, 3), 1, (31, 47)),        # odd sizes everywhere
])
def test_adapter_output_size(patch, img_size, feat_size, batch, out_size):
    m = UPLiFT(in_channels=8, patch_size=patch).eval()
    img, feats = torch.randn(batch, 3, *img_size), torch.randn(batch, 8, *feat_size)
    with torch.inference_mode():
        out = m(img, feats, out_size)
    assert out.shape == (batch, 8, *out_size)
    assert torch.isfinite(out).all()


def test_steps_and_encoder_size_policy():
    m = UPLiFT(in_channels=8, patch_size=14)
    assert m.steps_for((32, 32), (448, 448)) == 4           # 16x then 512 -> 448
    assert m.encoder_size((448, 448), (32, 32)) == (512, 512)  # the official pre-scale
    assert m.steps_for((32, 32), (64, 64)) == 1
    assert m.steps_for((32, 32), (65, 64)) == 2
    m16 = UPLiFT(in_channels=8, patch_size=16)
    assert m16.steps_for((28, 28), (448, 448)) == 4
    assert m16.encoder_size((448, 448), (28, 28)) == (448, 448)
    assert m16.encoder_size((896, 896), (28, 28)) == (896, 896)  # a larger guidance image keeps its detail


def test_adapter_pixel_dense_is_official_route(small_dino):
    """forward(image, feats, (H, W)) for patch 14 == 4 official iterations + outsize resize."""
    img, feats = torch.randn(1, 3, 56, 56), torch.randn(1, 16, 4, 4)
    m = small_dino
    with torch.no_grad():
        out = m(img, feats, (56, 56))
        m.enable_iterative(4)
        off = m.forward_official(img, feats, outsize=[56, 56])
        m.iters = None
    assert torch.allclose(out, off, atol=1e-6)


def test_return_steps_api(small_dino):
    img, feats = torch.randn(1, 3, 56, 56), torch.randn(1, 16, 4, 4)
    m = small_dino
    with torch.no_grad():
        m.enable_iterative(2).return_steps(True)
        steps = m.forward_official(img, feats)
        m.return_steps(False)
        last = m.forward_official(img, feats)
        m.iters = None
    assert [tuple(s.shape[-2:]) for s in steps] == [(8, 8), (16, 16)]
    assert torch.allclose(steps[-1], last)


def test_registry_and_normalisation():
    assert upsamplers.get("uplift") is UPLiFT and upsamplers.get("uplift_vae") is UPLiFTVAE
    assert upsamplers.for_official_method("UPLiFT") is UPLiFT
    assert tuple(UPLiFT.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(UPLiFTVAE.image_mean) == (0.0, 0.0, 0.0) and tuple(UPLiFTVAE.image_std) == (1.0, 1.0, 1.0)
    m = UPLiFT(in_channels=8, patch_size=14, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert m.image_mean == (0.5, 0.5, 0.5) and tuple(UPLiFT.image_mean) == (0.485, 0.456, 0.406)
    v = UPLiFTVAE(arch=SMALL_VAE_CFG)
    with torch.inference_mode():
        assert v.eval()(torch.rand(1, 3, 32, 32), torch.randn(1, 4, 4, 4), (32, 32)).shape == (1, 4, 32, 32)


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trips(tmp_path, small_dino):
    from safetensors.torch import save_file

    sd = {k: v.clone().contiguous() for k, v in small_dino.state_dict().items()}
    st = tmp_path / "uplift.safetensors"
    save_file(sd, str(st))
    pth = tmp_path / "uplift.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, str(pth))
    for path in (st, pth):
        m = UPLiFT(in_channels=16, patch_size=14)
        m.load_official(str(path))
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # other official prefixes / wrappers
    m = UPLiFT(in_channels=16, patch_size=14)
    m.load_official_state_dict({"model": {f"uplift.{k}": v for k, v in sd.items()}})
    assert torch.equal(m.attender.conv1.weight, small_dino.attender.conv1.weight)


def test_checkpoint_errors(tmp_path, small_dino):
    sd = dict(small_dino.state_dict())
    sd.pop("attender.conv1.bias")
    sd["attender.conv2.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, str(bad))
    m = UPLiFT(in_channels=16, patch_size=14)
    with pytest.raises(UpbenchError) as err:
        m.load_official(str(bad))
    assert "attender.conv1.bias" in str(err.value) and "attender.conv2.weight" in str(err.value)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)
    # wrong channel count -> shape mismatch named
    with pytest.raises(UpbenchError, match="shape"):
        UPLiFT(in_channels=32, patch_size=14).load_official_state_dict(dict(small_dino.state_dict()))
    with pytest.raises(UpbenchError, match="neither a file nor an official checkpoint"):
        m.load_official("uplift_no_such_name")


def test_offline_download_is_clear(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert set(UPLiFT.pretrained_sources) == {"uplift_dinov2-s14", "uplift_dinov3-splus16", "uplift_sd1.5vae", "demo"}
    src = UPLiFT.pretrained_sources["uplift_dinov2-s14"]
    assert (src.hf_repo, src.hf_file) == ("UPLiFT-upsampler/uplift_dinov2-s14", "uplift_dinov2-s14.safetensors")
    with pytest.raises(UpbenchError, match="could not download") as err:
        UPLiFT(in_channels=384, patch_size=14).load_official("uplift_dinov2-s14")
    assert "UPLiFT-upsampler/uplift_dinov2-s14" in str(err.value)


def test_packaged_demo_checkpoint_loads_for_the_demo_backbone():
    model = UPLiFT(in_channels=112, patch_size=16).load_official("demo")
    assert model.num_params == 632_849  # 789,521 - (384 - 112) * 64 * 9 (decoder block_0 input)
    with pytest.raises(UpbenchError, match="shape mismatches"):
        UPLiFT(in_channels=384, patch_size=16).load_official("demo")
