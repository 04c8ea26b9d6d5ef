import pytest
import torch

from upbench.backbones.timm_models import TimmViT, efficientnet_lite0_weights
from upbench.pipeline import build_backbone as create_backbone
from upbench.errors import UpbenchError


def _photo(name):
    from skimage import data

    img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)


def test_demo_weights_remap_gives_a_real_imagenet_classifier():
    import timm

    from upbench.backbones.timm_models import _load_local_weights

    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    _load_local_weights(model, efficientnet_lite0_weights(), remap="positional")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        cat = model((_photo("chelsea") - mean) / std).argmax().item()
        cup = model((_photo("coffee") - mean) / std).argmax().item()
    assert 281 <= cat <= 285          # ImageNet cat classes (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert cup in (967, 968, 504)     # espresso, cup, coffee mug


def test_demo_backbone_is_stride16_stage_with_112_channels():
    bb = create_backbone({"kind": "demo", "name": "demo"})
    feats, prefix = bb(torch.randn(2, 3, 224, 160))
    assert (bb.channels, bb.patch_size) == (112, 16)
    assert feats.shape == (2, 112, 14, 10) and prefix.shape == (2, 0, 112)
    assert not any(p.requires_grad for p in bb.parameters())


def test_vit_wrapper_returns_normed_last_block_tokens_and_prefix(tmp_path):
    bb = TimmViT("vit_small_patch14_dinov2.lvd142m", pretrained=False, name="dinov2_s14")
    x = torch.randn(1, 3, 112, 84)
    feats, prefix = bb(x)
    assert (bb.channels, bb.patch_size) == (384, 14)
    assert feats.shape == (1, 384, 8, 6) and prefix.shape == (1, 1, 384)
    with torch.no_grad():
        tokens = bb.model.forward_features(x)  # final norm applied: patch tokens follow the prefix
    assert torch.allclose(feats.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)
    # local weights (safetensors) round trip
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    bb2 = TimmViT("vit_small_patch14_dinov2.lvd142m", pretrained=False, weights=str(path))
    assert torch.allclose(bb2(x)[0], feats)


def test_dinov3_prefix_has_cls_and_registers():
    bb = create_backbone({"kind": "timm_vit", "name": "dinov3_splus16", "pretrained": False,
                          "timm_name": "vit_small_plus_patch16_dinov3.lvd1689m"})
    feats, prefix = bb(torch.randn(1, 3, 64, 64))
    assert bb.patch_size == 16 and feats.shape[-2:] == (4, 4) and prefix.shape[1] == 5


def test_pretrained_offline_names_the_local_weights_option():
    with pytest.raises(UpbenchError, match=r"backbone\.weights=/path/to/file"):
        create_backbone({"kind": "timm_vit", "name": "x", "timm_name": "vit_small_patch14_dinov2.lvd142m",
                         "pretrained": True})


def test_wrong_local_weights_name_the_bad_keys(tmp_path):
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UpbenchError, match="missing keys"):
        create_backbone({"kind": "timm_vit", "name": "x", "timm_name": "vit_small_patch14_dinov2.lvd142m",
                         "weights": str(tmp_path / "bad.pth")})
