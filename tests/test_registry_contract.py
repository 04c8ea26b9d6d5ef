"""Registry behaviour and the one contract every registered upsampler follows."""
import pytest
import torch

from upbench import upsamplers
from upbench.errors import UnknownNameError, UpbenchError
from upbench.registry import Registry


def test_registry_register_create_available():
    reg = Registry("widget")

    @reg.register("b")
    class B:
        def __init__(self, x=1):
            self.x = x

    @reg.register()
    class Alpha:
        pass

    assert reg.available() == ["alpha", "b"]
    assert reg.create("b", x=3).x == 3
    assert B.registry_name == "b"
    with pytest.raises(ValueError):
        reg.register("b")(Alpha)


def test_unknown_upsampler_error_lists_names():
    with pytest.raises(UnknownNameError) as err:
        upsamplers.create("no_such_upsampler")
    msg = str(err.value)
    assert "unknown upsampler 'no_such_upsampler'" in msg and "bilinear" in msg and "nearest" in msg
    assert "\n" not in msg


def test_bilinear_and_nearest_follow_the_suite_conventions():
    feats = torch.randn(2, 5, 3, 4)
    img = torch.randn(2, 3, 30, 40)
    bil = upsamplers.create("bilinear")(img, feats, (30, 40))
    near = upsamplers.create("nearest")(img, feats, (30, 40))
    assert torch.equal(bil, torch.nn.functional.interpolate(feats, (30, 40), mode="bilinear", align_corners=False))
    assert torch.equal(near, torch.nn.functional.interpolate(feats, (30, 40), mode="nearest-exact"))
    assert not torch.allclose(bil, near)


def _contract_cases(name):
    if name == "uplift_vae":
        return 4, 8
    return 32, 14


@pytest.mark.parametrize("name", upsamplers.available())
@pytest.mark.parametrize("batch,img,grid,out", [
    (1, (56, 56), (4, 4), (56, 56)),       # pixel-dense, square
    (2, (48, 64), (3, 4), (40, 52)),       # batch 2, non-square, arbitrary output
    (1, (32, 32), (2, 2), (64, 48)),       # output larger than the image
])
def test_every_upsampler_returns_exactly_output_size(name, batch, img, grid, out):
    channels, patch = _contract_cases(name)
    torch.manual_seed(0)
    model = upsamplers.create(name, in_channels=channels, patch_size=patch).eval()
    image = torch.randn(batch, 3, *img)
    feats = torch.randn(batch, channels, *grid)
    with torch.no_grad():
        y = model(image, feats, out)
    assert y.shape == (batch, channels, *out)
    assert torch.isfinite(y).all()


def test_load_official_rejects_unknown_names():
    model = upsamplers.create("bilinear")
    with pytest.raises(UpbenchError, match="neither a file nor an official checkpoint"):
        model.load_official("not-a-checkpoint")
