"""NAF: parameters and official key names, the neighbourhood-attention operator against a direct reading of its
definition (window rule, nearest-exact resize, scale, heads), the RoPE, the pre-scale rule, loading, and the
optional NATTEN path.  Parity with the official code is in test_golden.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN, randomise
from upbench import checkpoints, upsamplers
from upbench.errors import UpbenchError
from upbench.upsamplers._naf_attention import (axis_plan, cross_scale_attention, natten_available,
                                               natten_cross_scale_attention, window)
from upbench.upsamplers.base import kernel_path
from upbench.upsamplers.naf import NAF

NAF_PARAMS = 662_528


# ----------------------------------------------------------------------------------------------- parameters, keys
@pytest.mark.parametrize("channels", [None, 8, 112, 384, 1024])
def test_parameter_count_does_not_depend_on_the_channels(channels):
    model = NAF(in_channels=channels)
    assert model.num_params == NAF_PARAMS
    sd = model.state_dict()
    assert len(sd) == 37 and all(k.startswith("image_encoder.") for k in sd)
    assert "image_encoder.rope.periods" in sd and "image_encoder.rope.periods" not in dict(model.named_parameters())


def test_state_dict_keys_match_the_official_listing():
    listing = GOLDEN / "naf" / "params_naf_c384.json"
    if not listing.is_file():
        pytest.skip(f"no official key listing at {listing}")
    ref = json.loads(listing.read_text())
    sd = NAF(in_channels=384).state_dict()
    assert [e["key"] for e in ref["state_dict"]] == list(sd)
    assert all(tuple(sd[e["key"]].shape) == tuple(e["shape"]) for e in ref["state_dict"])
    assert ref["total_parameters"] == NAF_PARAMS


def test_rope_periods_and_registry():
    periods = NAF().image_encoder.rope.periods
    assert periods.dtype == torch.float32 and periods.shape == (16,)
    torch.testing.assert_close(periods, torch.tensor([100.0 ** (k / 16) for k in range(16)]), rtol=1e-6, atol=0)
    assert upsamplers.get("naf") is NAF and upsamplers.for_official_method("NAF") is NAF
    assert NAF.family == "local" and "Apache-2.0" in NAF.licence


# ----------------------------------------------------------------------------------------------- the window rule
def test_window_rule_worked_examples():
    """NAF.md's examples: L = 85 from h = 10 (dilation 8) and L = 12 at dilation 1."""
    assert window(83, 85, 9, 8) == list(range(19, 84, 8))
    assert window(5, 85, 9, 8) == list(range(5, 70, 8))
    for i in range(5):
        assert window(i, 12, 9, 1) == list(range(0, 9))
    assert window(5, 12, 9, 1) == list(range(1, 10)) and window(6, 12, 9, 1) == list(range(2, 11))
    for i in range(7, 12):
        assert window(i, 12, 9, 1) == list(range(3, 12))
    assert window(3, 20, 9, 6) == [3, 9, 15]   # fewer than 9 group members: the whole group


def reference_attention(q, k, v, heads, kernel, scale):
    """The operator read literally: keys / values resized with nearest-exact, then for every query the Cartesian
    product of its row and column windows on the resized grid (dilation = output // input, at least 1)."""
    b, dq, ho, wo = q.shape
    c = v.shape[1]
    kup = F.interpolate(k, size=(ho, wo), mode="nearest-exact")
    vup = F.interpolate(v, size=(ho, wo), mode="nearest-exact")
    dil = (max(1, ho // k.shape[-2]), max(1, wo // k.shape[-1]))

    def win(i, length, d):   # written from the fact sheet, independently of the implementation
        g, p = i % d, i // d
        members = len(range(g, length, d))
        n = min(kernel, members)
        s = min(max(p - kernel // 2, 0), members - n)
        return [g + (s + a) * d for a in range(n)]

    out = torch.zeros(b, c, ho, wo, dtype=q.dtype)
    hq, hv = dq // heads, c // heads
    for i in range(ho):
        for j in range(wo):
            cells = [(r, s) for r in win(i, ho, dil[0]) for s in win(j, wo, dil[1])]
            rows, cols = torch.tensor([r for r, _ in cells]), torch.tensor([s for _, s in cells])
            for n in range(heads):
                keys = kup[:, n * hq:(n + 1) * hq, rows, cols]            # (B, hq, K)
                vals = vup[:, n * hv:(n + 1) * hv, rows, cols]            # (B, hv, K)
                logits = torch.einsum("bd,bdk->bk", q[:, n * hq:(n + 1) * hq, i, j], keys) * scale
                out[:, n * hv:(n + 1) * hv, i, j] = torch.einsum("bk,bdk->bd", logits.softmax(-1), vals)
    return out


@pytest.mark.parametrize("out,grid,kernel", [
    ((27, 27), (3, 3), 9),     # integer ratio, grid under the kernel: every query sees the whole grid
    ((36, 31), (10, 9), 9),    # integer rows, non-integer columns, border windows shifted inwards
    ((23, 19), (5, 7), 3),     # non-integer both ways, repeated cells within a window
    ((12, 16), (12, 16), 5),   # keys on the query grid: plain neighbourhood attention, dilation 1
    ((7, 5), (11, 9), 9),      # output smaller than the features
])
@pytest.mark.parametrize("kernels", ["auto", "device"])
def test_attention_equals_its_definition(out, grid, kernel, kernels):
    g = torch.Generator().manual_seed(0)
    heads = 2
    q = torch.randn(2, 8, *out, generator=g, dtype=torch.float64) * 3
    k = torch.randn(2, 8, *grid, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 6, *grid, generator=g, dtype=torch.float64)
    ref = reference_attention(q, k, v, heads, kernel, 0.5)
    with kernel_path(kernels):
        got = cross_scale_attention(q, k, v, heads, kernel, 0.5)
        blocked = cross_scale_attention(q, k, v, heads, kernel, 0.5, block_elements=1)   # one row group at a time
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(blocked, ref, atol=1e-12, rtol=1e-12)


def test_integer_ratios_group_without_padding():
    """448 from 32 (dilation 14): one group per feature row, 14 queries each, nothing padded or gathered."""
    plan = axis_plan(448, 32, 9, 14)
    assert plan.regular and tuple(plan.members.shape) == (32, 14) and plan.valid is None
    assert torch.equal(plan.keys[0], torch.arange(9)) and torch.equal(plan.keys[-1], torch.arange(23, 32))
    ragged = axis_plan(85, 10, 9, 8)
    assert not ragged.regular and ragged.members.numel() < 2 * 85
    assert sorted(ragged.members.reshape(-1)[ragged.group * ragged.members.shape[1] + ragged.offset].tolist()) == \
        list(range(85))


def test_output_is_a_convex_combination_of_the_features():
    torch.manual_seed(0)
    model = randomise(NAF(in_channels=8), seed=2)
    image = torch.randn(1, 3, 64, 64)
    flat = torch.randn(1, 8, 1, 1).expand(1, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(image, flat, (64, 64)), flat[..., :1, :1].expand(1, 8, 64, 64), atol=1e-6)
        feats = torch.randn(1, 8, 8, 8)
        out = model(image, feats, (64, 64))
    lo, hi = feats.amin((2, 3), keepdim=True), feats.amax((2, 3), keepdim=True)
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def test_each_pixel_reads_only_its_9x9_cells():
    model = randomise(NAF(in_channels=4), seed=3)
    spike = torch.zeros(1, 4, 16, 16)
    spike[:, :, 0, 0] = 1.0   # one feature cell in a corner; output 64x64, 4 pixels per cell
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), spike, (64, 64))
    assert (out[..., :20, :20] > 0).all()                               # cells 0-4: their windows start at cell 0
    assert (out[..., 20:, :] == 0).all() and (out[..., :, 20:] == 0).all()   # cell 5 on: windows start at 1 or later


# ----------------------------------------------------------------------------------------------- RoPE, pre-scale
def test_rope_rotates_each_head_by_row_then_column_angles():
    rope = NAF().eval().image_encoder.rope
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, 3, 5, generator=g, dtype=torch.float64)
    got = rope.double()(x)
    periods = rope.periods.tolist()   # float32 values of 100 ** (k / 16) (checked above)
    for head in (0, 3):
        for i, j in ((0, 0), (2, 4), (1, 3)):
            r, c = 2 * (i + 0.5) / 3 - 1, 2 * (j + 0.5) / 5 - 1
            angles = [2 * math.pi * r / p for p in periods] + [2 * math.pi * c / p for p in periods]
            for a in (0, 7, 16, 31):
                x1, x2 = x[0, head * 64 + a, i, j].item(), x[0, head * 64 + a + 32, i, j].item()
                cos, sin = math.cos(angles[a]), math.sin(angles[a])
                assert got[0, head * 64 + a, i, j].item() == pytest.approx(x1 * cos - x2 * sin, abs=1e-12)
                assert got[0, head * 64 + a + 32, i, j].item() == pytest.approx(x2 * cos + x1 * sin, abs=1e-12)


def test_rope_rescales_coordinates_only_in_training():
    rope = NAF().image_encoder.rope
    x = torch.randn(1, 256, 6, 6)
    assert torch.equal(rope.eval()(x), rope(x))
    torch.manual_seed(0)
    assert not torch.allclose(rope.train()(x), rope.eval()(x))


@pytest.mark.parametrize("image,out,expected", [
    ((224, 168), (96, 24), (96, 96)),     # NAF.md: both sides capped by 4x the smaller output side
    ((256, 256), (48, 36), (144, 144)),   # the golden pre-scale case
    ((448, 448), (112, 112), (448, 448)),  # exactly 4x: not shrunk (the test is strict)
    ((144, 144), (198, 198), (144, 144)),  # smaller than the output: used as is
])
def test_image_prescale_rule(image, out, expected):
    got = NAF().encoder_input(torch.randn(1, 3, *image), out)
    assert tuple(got.shape[-2:]) == expected


# ----------------------------------------------------------------------------------------------- loading, errors
def test_loads_an_official_state_dict_strictly_by_name_and_path(tmp_path, monkeypatch):
    ref = randomise(NAF(), seed=4)
    path = tmp_path / "naf_release.pth"
    torch.save(ref.state_dict(), path)
    asked = []
    monkeypatch.setattr(checkpoints, "download", lambda source, what, local="": asked.append(source) or str(path))
    model = upsamplers.create("naf", pretrained=True)
    assert asked == [NAF.pretrained_sources["naf_release"]] and model.pretrained_cfg.tag == "naf_release"
    local = upsamplers.create("naf", weights=str(path), backbone="dinov2_s14")   # any backbone: zero-shot
    for m in (model, local):
        for k, v in ref.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    assert local.in_channels == 384
    broken = {k.replace("sem_encoder", "semantic"): v for k, v in ref.state_dict().items()}
    torch.save(broken, path)
    with pytest.raises(UpbenchError) as err:
        upsamplers.create("naf", weights=str(path))
    assert "\n" not in str(err.value) and "missing keys" in str(err.value) and "sem_encoder" in str(err.value)


def test_offline_download_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable\nsecond line")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UpbenchError) as err:
        upsamplers.create("naf", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("could not download naf weights 'naf_release'")
    assert "github.com/valeoai/NAF" in msg and "upsampler.weights=/path/to/file" in msg


def test_bad_inputs_are_refused_with_one_line():
    with pytest.raises(UpbenchError, match="in_channels=6 must be divisible by heads_attn=4"):
        upsamplers.create("naf", in_channels=6)
    with pytest.raises(UpbenchError, match="6 channels, which is not divisible by heads_attn=4"):
        NAF()(torch.randn(1, 3, 32, 32), torch.randn(1, 6, 4, 4), (32, 32))
    with pytest.raises(UpbenchError, match="kernel_size must be odd"):
        NAF(kernel_size=8)
    with pytest.raises(UpbenchError, match="attention='cuda'"):
        NAF(attention="cuda")
    with pytest.raises(UpbenchError, match="unsupported official constructor arguments"):
        NAF.from_official("NAF", {"dim": 256, "heads": 4})
    with pytest.raises(UpbenchError, match="use_encoder=False"):
        NAF.from_official("NAF", {"use_encoder": False})
    assert NAF.from_official("NAF", {"dim": 256, "use_semencoder": True, "name": "naf"}).dim == 256


def test_golden_key_maps_match():
    """The debug output of the golden files: the pooled key map the attention reads (not part of the pass test)."""
    cases = sorted((GOLDEN / "naf").glob("naf_*.pt")) if (GOLDEN / "naf").is_dir() else []
    if not cases:
        pytest.skip(f"no NAF golden cases in {GOLDEN / 'naf'}")
    case = torch.load(cases[0], weights_only=True)
    model = NAF.from_official(case["method"], case["constructor"])
    model.load_official_state_dict(case["state_dict"], strict=True)
    with torch.no_grad():
        got = model.eval().run_official(case["method"], case["inputs"], case["constructor"])
    torch.testing.assert_close(got["keys_pooled"], case["debug"]["keys_pooled"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- NATTEN
@pytest.mark.skipif(not natten_available(), reason="natten is not installed (optional; the torch path needs nothing)")
@pytest.mark.parametrize("out,grid", [((90, 90), (10, 10)), ((85, 120), (10, 14)), ((45, 50), (9, 10)),
                                      ((20, 24), (20, 24))])
def test_natten_path_equals_the_torch_path(out, grid):
    g = torch.Generator().manual_seed(0)
    # head widths 16 and 16: NATTEN >= 0.20's CPU backend (flex) needs equal powers of two; NAF's own sizes differ
    q = torch.randn(1, 64, *out, generator=g) * 3
    k = torch.randn(1, 64, *grid, generator=g) * 3
    v = torch.randn(1, 64, *grid, generator=g)
    try:
        got = natten_cross_scale_attention(q, k, v, 4, 9, 0.25)
    except (RuntimeError, NotImplementedError) as exc:   # a NATTEN without a backend for this device
        pytest.skip(f"this NATTEN cannot run here: {str(exc).splitlines()[0][:100]}")
    torch.testing.assert_close(got, cross_scale_attention(q, k, v, 4, 9, 0.25), atol=1e-5, rtol=1e-5)


def test_natten_path_refuses_sizes_natten_cannot_take():
    q, k, v = torch.randn(1, 16, 36, 36), torch.randn(1, 16, 4, 4), torch.randn(1, 8, 4, 4)
    with pytest.raises(UpbenchError, match=r"NATTEN needs 9 x dilation <= output size.*attention='torch'"):
        natten_cross_scale_attention(q, k, v, 4, 9, 0.25)


def test_natten_backend_of_the_model():
    if not natten_available():
        with pytest.raises(UpbenchError, match=r"attention='natten' needs the natten package \(pip install natten\)"):
            NAF(attention="natten")
        return
    torch.manual_seed(0)
    ref = randomise(NAF(), seed=5)
    model = NAF(attention="natten")
    model.load_state_dict(ref.state_dict())
    image, feats = torch.randn(1, 3, 90, 90), torch.randn(1, 256, 10, 10)   # value heads as wide as the key heads
    with torch.no_grad():
        expected = ref.eval()(image, feats, (90, 90))
        try:
            got = model.eval()(image, feats, (90, 90))
        except UpbenchError as exc:
            pytest.skip(str(exc))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("out,grid", [((48, 40), (12, 10)), ((37, 29), (9, 10))], ids=["regular", "ragged"])
def test_device_path_splits_only_when_free_memory_is_short(monkeypatch, out, grid):
    from upbench.upsamplers import base

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 16, *s, generator=g) for s in (out, grid, grid))
    whole = cross_scale_attention(q, k, v, 4, 9, 0.25)
    monkeypatch.setitem(base.ASSUMED_FREE_BYTES, "cpu", 1 << 16)   # a few row groups per piece
    with kernel_path("device"):
        split = cross_scale_attention(q, k, v, 4, 9, 0.25)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
