"""JAFAR and AnyUp adapters: sizes, parameter counts, chunking, dtypes, window mask, official weights."""
import pytest
import torch
import yaml

from upbench import upsamplers
from conftest import ASSETS, GOLDEN, ROOT
from upbench.errors import UpbenchError
from upbench.upsamplers.anyup import AnyUp, window_1d, window_mask
from upbench.upsamplers.jafar import JAFAR
from upbench.upsamplers.layers import RoPE, create_coordinate

WEIGHTS = ASSETS / "weights"
JAFAR_FILE = WEIGHTS / "jafar_vit_small_patch14_dinov2.lvd142m.pth"
ANYUP_FILES = [WEIGHTS / "anyup_paper.pth", WEIGHTS / "anyup_multi_backbone.pth"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids contention with other test processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(b=2, c=16, img=(40, 30), feat=(5, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, *img, generator=g).to(dtype)
    feats = torch.randn(b, c, *feat, generator=g).to(dtype)
    return image, feats


def _model(name, c=16, **kw):
    torch.manual_seed(0)
    return upsamplers.create(name, in_channels=c, patch_size=14, **kw).eval()


# ----------------------------------------------------------------------------- registry, parameters
def test_registry_and_official_methods():
    assert upsamplers.get("jafar") is JAFAR and upsamplers.get("anyup") is AnyUp
    assert upsamplers.for_official_method("JAFAR") is JAFAR
    assert upsamplers.for_official_method("AnyUp") is AnyUp


def test_parameter_counts():
    assert JAFAR(in_channels=384).num_params == 628_480
    assert JAFAR(in_channels=768).num_params == 727_168
    assert AnyUp().num_params == 878_080
    assert AnyUp(in_channels=768).num_params == 878_080


def test_state_dict_keys_follow_official_layout():
    jk = JAFAR(in_channels=384).state_dict()
    assert tuple(jk["cross_decode.cross_attn.attention.v_proj_weight"].shape) == (128, 384)
    assert tuple(jk["key_features_encoder.0.weight"].shape) == (128, 384, 1, 1)
    assert "image_encoder.1.norm1.weight" in jk and len(jk) == 65
    ak = AnyUp().state_dict()
    assert tuple(ak["cross_decode.cross_attn.attention.in_proj_weight"].shape) == (384, 128)
    assert tuple(ak["key_features_encoder.0.basis"].shape) == (128, 1, 5, 5)
    assert tuple(ak["aggregation.0.weight"].shape) == (128, 256, 3, 3)
    assert "image_encoder.1.block.5.weight" in ak and len(ak) == 73


def test_rope_init_and_coordinates():
    f = RoPE(128).freqs.detach()
    base = (100.0 ** torch.linspace(0, -1, 32)) * 2 * torch.pi
    assert torch.allclose(f[0, :32], base) and torch.allclose(f[0, 32:64], base)
    assert torch.allclose(f[1, 64:96], base) and torch.allclose(f[1, 96:], base)
    assert f[0, 64:].abs().sum() == 0 and f[1, :64].abs().sum() == 0
    c = create_coordinate(3, 2, dtype=torch.float64)
    assert c.shape == (1, 6, 2) and c.dtype == torch.float64
    assert c[0].tolist() == [[0, 0], [0, 1], [0.5, 0], [0.5, 1], [1, 0], [1, 1]]


# ----------------------------------------------------------------------------- output contract
@pytest.mark.parametrize("name", ["jafar", "anyup"])
@pytest.mark.parametrize("size", [(7, 9), (32, 24), (50, 61)])
def test_exact_output_size(name, size):
    model = _model(name)
    image, feats = _inputs()
    with torch.no_grad():
        out = model(image, feats, size)
    assert out.shape == (2, 16, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["jafar", "anyup"])
def test_int_size_and_default_size(name):
    model = _model(name)
    image, feats = _inputs(b=1, img=(20, 28))
    with torch.no_grad():
        assert model(image, feats, 12).shape == (1, 16, 12, 12)
        assert model(image, feats, None).shape == (1, 16, 20, 28)


def test_batch_independence():
    for name in ("jafar", "anyup"):
        model = _model(name)
        image, feats = _inputs()
        with torch.no_grad():
            both = model(image, feats, (11, 13))
            one = model(image[1:], feats[1:], (11, 13))
        assert torch.allclose(both[1:], one, atol=1e-5)


@pytest.mark.parametrize("c", [16, 64, 384])
def test_anyup_channel_agnostic(c):
    model = _model("anyup", c=384)  # in_channels is ignored
    image, feats = _inputs(b=1, c=c, img=(24, 24), feat=(4, 4))
    with torch.no_grad():
        out = model(image, feats, (10, 14))
    assert out.shape == (1, c, 10, 14) and torch.isfinite(out).all()


def test_jafar_rejects_wrong_channel_count():
    model = _model("jafar", c=16)
    image, feats = _inputs(c=8)
    with pytest.raises(UpbenchError, match="16 feature channels"):
        model(image, feats, (8, 8))


@pytest.mark.parametrize("name", ["jafar", "anyup"])
def test_q_chunk_size_does_not_change_output(name):
    model = _model(name)
    image, feats = _inputs()
    with torch.no_grad():
        ref = model(image, feats, (13, 11), q_chunk_size=10**9)
        for chunk in (1, 7, 100, 142):
            out = model(image, feats, (13, 11), q_chunk_size=chunk)
            assert torch.allclose(out, ref, rtol=0, atol=2e-6), chunk
        auto = model(image, feats, (13, 11))
    assert torch.allclose(auto, ref, rtol=0, atol=2e-6)
    chunked = _model(name, q_chunk_size=50)
    with torch.no_grad():
        assert torch.allclose(chunked(image, feats, (13, 11)), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["jafar", "anyup"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_dtypes(name, dtype):
    model = _model(name)
    image, feats = _inputs(b=1)
    with torch.no_grad():
        ref = model(image, feats, (12, 10))
        low = model.to(dtype)(image.to(dtype), feats.to(dtype), (12, 10))
    assert low.dtype == dtype and low.shape == ref.shape and torch.isfinite(low).all()
    tol = 1e-4 if dtype == torch.float64 else 0.15
    assert (low.float() - ref).abs().max() < tol


def test_float32_model_accepts_other_input_dtypes():
    model = _model("anyup")
    image, feats = _inputs(b=1)
    out = model(image.double(), feats.to(torch.bfloat16), (8, 8))
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- attention structure
def _one_hot_features(h, w, b=1):
    """Features whose channel c is 1 at key pixel c only, so the output is the attention-weight row itself."""
    eye = torch.eye(h * w).reshape(h * w, h, w)
    return eye.unsqueeze(0).expand(b, -1, -1, -1).contiguous()


def _attention_rows(model, image, feats, size):
    """Run the model, then re-run its cross-attention block on the same queries/keys with one-hot values: the
    result is the (head-averaged) attention-weight map (B, h*w, H, W) the first run applied to the features."""
    seen = {}
    handle = model.cross_decode.register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args))
    try:
        with torch.no_grad():
            out = model(image, feats, size)
    finally:
        handle.remove()
    query, key, value = seen["args"][:3]
    b, _, h, w = value.shape
    with torch.no_grad():
        att = model.cross_decode(query, key, _one_hot_features(h, w, b))
    return out, att


def test_jafar_outputs_are_convex_combinations_of_values():
    h, w = 3, 4
    model = _model("jafar", c=24)
    image, feats = _inputs(b=2, c=24, feat=(h, w))
    out, att = _attention_rows(model, image, feats, (9, 7))
    assert att.shape == (2, h * w, 9, 7)
    assert (att >= 0).all()
    assert torch.allclose(att.sum(1), torch.ones(2, 9, 7), atol=1e-5)
    combo = torch.einsum("bkyx,bck->bcyx", att, feats.flatten(2))  # weights applied to the RAW features
    assert torch.allclose(out, combo, atol=1e-5)


def test_anyup_attention_is_windowed_and_normalised():
    h, w, size = 6, 5, (12, 8)
    model = _model("anyup")
    image, feats = _inputs(b=1, c=16, feat=(h, w))
    out, att = _attention_rows(model, image, feats, size)
    assert torch.allclose(out, torch.einsum("bkyx,bck->bcyx", att, feats.flatten(2)), atol=1e-5)
    att = att[0].flatten(1).T  # (H*W, h*w)
    assert torch.allclose(att.sum(1), torch.ones(att.shape[0]), atol=1e-5)
    disallowed = window_mask(size, (h, w), 0.1)
    assert (att[disallowed] == 0).all() and (att[~disallowed] > 0).all()


def test_window_mask_hand_computed():
    # 24 queries over 12 keys: query 0 -> pos 1/48: rows [0, ceil(0.1208*12)=2); query 12 -> pos 0.5208:
    # [floor(0.4208*12)=5, ceil(0.6208*12)=8); query 23 -> pos 0.9792: [floor(0.8792*12)=10, 12)
    m = window_1d(24, 12, 0.1)
    assert m[0].nonzero().flatten().tolist() == [0, 1]
    assert m[12].nonzero().flatten().tolist() == [5, 6, 7]
    assert m[23].nonzero().flatten().tolist() == [10, 11]
    # 16 over 16: corner query sees rows [0, ceil(0.13125*16)=3); query 8 sees [floor(6.9)=6, ceil(10.1)=11)
    m = window_1d(16, 16, 0.1)
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[8].nonzero().flatten().tolist() == [6, 7, 8, 9, 10]
    full = window_mask((16, 16), (16, 16), 0.1)  # True = NOT allowed
    allowed = (~full).sum(1)
    assert allowed.min().item() == 9 and allowed.max().item() == 25
    # 2-D composition: query (row 0, col 8) allows rows 0..2 x cols 6..10
    row = (~full[8]).reshape(16, 16).nonzero().tolist()
    assert row == [[r, c] for r in range(3) for c in range(6, 11)]
    # non-square, chunk selection equals slicing the full mask
    part = window_mask((7, 9), (3, 5), 0.1, rows=slice(10, 30))
    assert torch.equal(part, window_mask((7, 9), (3, 5), 0.1)[10:30])


def test_window_mask_statistics_match_golden_records():
    cases = sorted(GOLDEN.glob("anyup_*.pt")) if GOLDEN.is_dir() else []
    if not cases:
        pytest.skip(f"no AnyUp golden cases in {GOLDEN}")
    for path in cases:
        case = torch.load(path, weights_only=True)
        checks, inputs = case["checks"], case["inputs"]
        if "window_mask_keys_allowed_min_max" not in checks:
            continue
        size = tuple(inputs.get("output_size") or inputs["image"].shape[-2:])
        mask = window_mask(size, tuple(inputs["features"].shape[-2:]), case["constructor"]["window_ratio"])
        allowed = (~mask).sum(1)
        assert [allowed.min().item(), allowed.max().item()] == checks["window_mask_keys_allowed_min_max"]
        assert mask.float().mean().item() == pytest.approx(checks["window_mask_fraction_disallowed"], abs=1e-7)


# ----------------------------------------------------------------------------- official weights
def test_pretrained_sources():
    src = JAFAR.pretrained_sources
    assert len(src) >= 7 and "vit_small_patch14_dinov2.lvd142m" in src
    s = src["vit_small_patch14_dinov2.lvd142m"]
    assert s.url == ("https://github.com/PaulCouairon/JAFAR/releases/download/Weights/"
                     "vit_small_patch14_dinov2.lvd142m.pth") and s.licence == "Apache-2.0"
    assert JAFAR.checkpoint_wrappers == ("jafar",)
    a = AnyUp.pretrained_sources
    assert a["anyup_paper"].url.endswith("/releases/download/checkpoint/anyup_paper.pth")
    assert a["anyup_multi_backbone"].url.endswith("/releases/download/checkpoint_v2/anyup_multi_backbone.pth")
    assert all(s.licence == "CC-BY-4.0" and "wimmerth/anyup" in s.url for s in a.values())


def _need(path):
    if not path.exists():
        pytest.skip(f"official weights not available: {path}")
    return path


def test_real_jafar_weights_load_strictly_and_run():
    model = JAFAR(in_channels=384).load_official(str(_need(JAFAR_FILE))).eval()
    image, feats = _inputs(b=1, c=384, img=(28, 28), feat=(2, 2))
    with torch.no_grad():
        out = model(image, feats, (14, 14))
    assert out.shape == (1, 384, 14, 14) and torch.isfinite(out).all()


@pytest.mark.parametrize("index", [0, 1])
def test_real_anyup_weights_load_strictly_and_run(index):
    model = AnyUp().load_official(str(_need(ANYUP_FILES[index]))).eval()
    image, feats = _inputs(b=1, c=32, img=(28, 28), feat=(4, 4))
    with torch.no_grad():
        out = model(image, feats)
    assert out.shape == (1, 32, 28, 28) and torch.isfinite(out).all()


def test_mismatched_weights_raise_naming_keys():
    with pytest.raises(UpbenchError, match="missing keys.*unexpected keys"):
        JAFAR(in_channels=384).load_official(str(_need(ANYUP_FILES[0])))
    with pytest.raises(UpbenchError, match="missing keys"):  # no 'jafar' unwrapping for AnyUp: nothing fits
        AnyUp().load_official(str(_need(JAFAR_FILE)))
    with pytest.raises(UpbenchError, match="missing keys.*unexpected keys"):
        AnyUp().load_official_state_dict(torch.load(JAFAR_FILE, map_location="cpu", weights_only=True)["jafar"])
    with pytest.raises(UpbenchError, match="shape mismatches"):
        JAFAR(in_channels=768).load_official(str(JAFAR_FILE))


def test_unknown_weight_name_is_a_clear_error():
    with pytest.raises(UpbenchError, match="known names"):
        JAFAR().load_official("no_such_backbone")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["jafar", "anyup"])
def test_config_builds(name):
    cfg = yaml.safe_load((ROOT / "configs" / "upsampler" / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    assert cfg["weights"] in upsamplers.get(name).pretrained_sources
    model = upsamplers.create(cfg["name"], in_channels=384, patch_size=14, **cfg["kwargs"])
    assert model.num_params == (628_480 if name == "jafar" else 878_080)
