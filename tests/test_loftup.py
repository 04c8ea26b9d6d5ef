"""LoftUp adapter: parameter count and key layout, output sizes, MinMax batch semantics, query chunking,
official-weight loading (hub file, Lightning checkpoint, wrong files, offline)."""
from pathlib import Path

import pytest
import torch

from upbench import upsamplers
from upbench.errors import UpbenchError
from upbench.upsamplers.loftup import LoftUp

ROOT = Path(__file__).resolve().parents[1]


def small(**kw):
    torch.manual_seed(0)
    kw.setdefault("in_channels", 16)
    model = upsamplers.create("loftup", **kw).eval()
    # non-trivial norms / BN statistics so that the checks below are discriminative
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def test_registered_and_official_method():
    assert upsamplers.get("loftup") is LoftUp
    assert upsamplers.for_official_method("LoftUp") is LoftUp


def test_param_count_and_keys_c384():
    model = LoftUp(in_channels=384)
    assert model.num_params == 4_303_894
    per = {n: sum(p.numel() for p in m.parameters()) for n, m in model.upsampler.named_children()}
    assert per == {"lr_pe": 20, "fourier_feat": 200, "first_conv": 2_209_882, "final_conv": 156_288,
                   "ca_transformer": 1_936_736}
    assert sum(p.numel() for p in model.channelnorm.parameters()) == 768
    sd = model.state_dict()
    assert len(sd) == 54
    assert all(k.startswith(("upsampler.", "channelnorm.norm.")) for k in sd)
    assert sd["upsampler.ca_transformer.layers.1.0.attention.in_proj_weight"].shape == (1212, 404)
    assert sd["upsampler.fourier_feat.1.biases"].shape == (2, 5, 20)
    assert sd["upsampler.lr_pe.biases"].shape == (2, 2, 5)


@pytest.mark.parametrize("batch,img,feat,out", [
    (1, (56, 56), (4, 4), (56, 56)),
    (2, (56, 56), (4, 4), (28, 40)),      # smaller, non-square output
    (3, (42, 70), (3, 5), (57, 33)),      # odd sizes, other aspect ratio
    (1, (28, 28), (2, 2), (64, 48)),      # output larger than the image
])
def test_exact_output_size(batch, img, feat, out):
    model = small()
    with torch.no_grad():
        y = model(torch.randn(batch, 3, *img), torch.randn(batch, 16, *feat), out)
    assert y.shape == (batch, 16, *out)
    assert torch.isfinite(y).all()


def test_output_size_none_and_int():
    model = small()
    image, feats = torch.randn(1, 3, 30, 20), torch.randn(1, 16, 2, 2)
    with torch.no_grad():
        assert model(image, feats, None).shape == (1, 16, 30, 20)
        assert model(image, feats, 24).shape == (1, 16, 24, 24)


def test_resized_guidance_equals_official_call():
    model = small()
    image, feats = torch.randn(1, 3, 40, 40), torch.randn(1, 16, 3, 3)
    with torch.no_grad():
        got = model(image, feats, (24, 32))
        ref = model.official_forward(
            feats, torch.nn.functional.interpolate(image, (24, 32), mode="bilinear", align_corners=False))
    assert torch.equal(got, ref)


def _two_different_images():
    torch.manual_seed(1)
    a = torch.rand(1, 3, 24, 32) * 0.3          # narrow colour range
    b = torch.rand(1, 3, 24, 32) * 4.0 - 2.0    # wide colour range
    return torch.cat([a, b]), torch.randn(2, 16, 2, 3)


def test_minmax_batch_default_depends_on_batch_mates():
    model = small()
    assert model.minmax == "batch"
    images, feats = _two_different_images()
    with torch.no_grad():
        together = model(images, feats, (24, 32))
        alone = torch.cat([model(images[i:i + 1], feats[i:i + 1], (24, 32)) for i in range(2)])
    assert (together - alone).abs().max() > 1e-2


def test_minmax_sample_is_batch_independent():
    model = small(minmax="sample")
    images, feats = _two_different_images()
    with torch.no_grad():
        together = model(images, feats, (24, 32))
        alone = torch.cat([model(images[i:i + 1], feats[i:i + 1], (24, 32)) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # at batch 1 the two modes agree
    model_b = small(minmax="batch")
    with torch.no_grad():
        torch.testing.assert_close(model_b(images[1:], feats[1:], (24, 32)), alone[1:], atol=1e-6, rtol=0)


def test_minmax_invalid():
    with pytest.raises(UpbenchError, match="minmax"):
        LoftUp(in_channels=8, minmax="global")


@pytest.mark.parametrize("chunk", [97, 331, 10_000])
def test_chunked_equals_unchunked(chunk):
    model = small()
    image, feats = torch.randn(2, 3, 30, 44), torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        model.q_chunk_size = None
        ref = model(image, feats, (30, 44))
        model.q_chunk_size = chunk
        got = model(image, feats, (30, 44))
    # identical maths; only matmul blocking may differ (a few float32 ulps on O(1) LayerNorm outputs)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_matches_nn_multiheadattention():
    """The attention reproduces nn.MultiheadAttention(q, kv, kv) on the same parameters."""
    model = small()
    attn = model.upsampler.ca_transformer.layers[0][0]
    q, kv = torch.randn(2, 50, 36), torch.randn(2, 7, 36)
    with torch.no_grad():
        k, v = attn.project_kv(kv)
        got = attn(q, k, v)
        nkv = attn.norm_kv(kv).transpose(0, 1)
        ref = q + attn.attention(attn.norm_q(q).transpose(0, 1), nkv, nkv)[0].transpose(0, 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_config_builds():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "upsampler" / "loftup.yaml")
    assert cfg.name == "loftup" and cfg.weights in LoftUp.pretrained_sources
    model = upsamplers.create(cfg.name, **OmegaConf.to_container(cfg.kwargs))
    assert model.num_params == 4_303_894 and model.minmax == "batch"


def test_pretrained_sources():
    src = LoftUp.pretrained_sources
    assert set(src) == {"loftup_dinov2s", "loftup_dinov2s_reg", "loftup_dinov2b", "loftup_dinov2b_reg",
                        "loftup_clip", "loftup_siglip", "loftup_siglip2"}
    assert src["loftup_dinov2s"].hf_repo == "haiwen/loftup-dinov2s"
    assert all(s.hf_file == "pytorch_model.bin" and s.licence for s in src.values())


# ------------------------------------------------------------------------------------------- official weights
def _reference_sd(c=16):
    torch.manual_seed(3)
    return {k: (torch.randn_like(v) if v.is_floating_point() else v.clone())
            for k, v in LoftUp(in_channels=c).state_dict().items()}


def test_hub_file_round_trip(tmp_path):
    sd = _reference_sd()
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    model = LoftUp(in_channels=16).load_official(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_lightning_checkpoint(tmp_path):
    sd = _reference_sd()
    inner = {k: v for k, v in sd.items() if k.startswith("upsampler.")}
    inner["model.1.norm.weight"] = sd["channelnorm.norm.weight"]
    inner["model.1.norm.bias"] = sd["channelnorm.norm.bias"]
    inner["model.0.blocks.0.weight"] = torch.randn(4, 4)      # backbone of the training wrapper
    inner["downsampler.attention_net.weight"] = torch.randn(3)  # training-only modules
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": inner}, path)
    model = LoftUp(in_channels=16).load_official(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_wrong_file_names_keys(tmp_path):
    sd = _reference_sd()
    del sd["upsampler.lr_pe.biases"]
    sd["upsampler.something_else.weight"] = torch.zeros(1)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    with pytest.raises(UpbenchError) as err:
        LoftUp(in_channels=16).load_official(str(path))
    msg = str(err.value)
    assert "missing keys" in msg and "upsampler.lr_pe.biases" in msg
    assert "unexpected keys" in msg and "upsampler.something_else.weight" in msg


def test_wrong_channel_count(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_reference_sd(16), path)
    with pytest.raises(UpbenchError, match="shape mismatches"):
        LoftUp(in_channels=24).load_official(str(path))


def test_offline_name_download(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UpbenchError, match="haiwen/loftup-dinov2s"):
        LoftUp(in_channels=16).load_official("loftup_dinov2s")
    with pytest.raises(UpbenchError, match="known names"):
        LoftUp(in_channels=16).load_official("loftup_nonexistent")
