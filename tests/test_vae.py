"""VAEs: TAEF2 loads the released weights strictly and round-trips real faces; the registry's errors are one clear
line (missing TAEF2 files, sd15 offline); the sd15 wrapper's shapes and ranges on a tiny local AutoencoderKL."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ASSETS, need
from upbench.errors import UpbenchError
from upbench.backbones.vae import TAEF2, create_vae

WEIGHTS = ASSETS / "weights"
FACES = ASSETS / "data" / "celebahq_56" / "src"
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


@pytest.fixture(scope="module")
def taef2_files():
    return need(WEIGHTS / "taef2_encoder.pth"), need(WEIGHTS / "taef2_decoder.pth")


@pytest.fixture(scope="module")
def taef2(taef2_files):
    return TAEF2.from_files(*taef2_files)


def face(path, size):
    """A real face, resized (antialiased bilinear) to size x size, in [0, 1]."""
    x = torch.from_numpy(np.array(Image.open(need(path)).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------ TAEF2
def test_taef2_loads_every_released_tensor(taef2, taef2_files):
    for part, path in zip(("encoder", "decoder"), taef2_files):
        released = torch.load(path, map_location="cpu", weights_only=True)
        own = getattr(taef2, part).state_dict()
        assert set(own) == set(released) and len(own) == 79
        for k, v in released.items():
            assert torch.equal(own[k], v.float()), k
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in taef2.parameters())
    assert (taef2.name, taef2.latent_channels, taef2.scale_factor) == ("taef2", 32, 8)


def test_taef2_strict_load_names_bad_keys(taef2_files, tmp_path):
    sd = torch.load(taef2_files[0], map_location="cpu", weights_only=True)
    sd.pop("11.pool.1.weight")
    sd["15.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "enc.pth")
    with pytest.raises(UpbenchError) as err:
        TAEF2.from_files(tmp_path / "enc.pth", taef2_files[1])
    assert "missing keys [11.pool.1.weight]" in str(err.value) and "unexpected keys [15.weight]" in str(err.value)


def test_taef2_shapes_and_range(taef2):
    x = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        z = taef2.encode(x)
        y = taef2.decode(z)
    assert z.shape == (2, 32, 6, 10) and z.dtype == torch.float32
    assert y.shape == (2, 3, 48, 80) and 0 <= y.min() and y.max() <= 1
    with pytest.raises(UpbenchError, match="multiple of 8"):
        taef2.encode(torch.rand(1, 3, 50, 64))


def test_taef2_round_trip_psnr_on_real_faces(taef2):
    # Measured at 256 px: 37.30 dB (female/039913) and 36.09 dB (male/006930); 8 faces at 512 px average 36.8 dB.
    # Misreading the architecture costs far more (e.g. GroupNorm branch moved after the block: ~31 dB, dropped: ~18).
    x = torch.cat([face(FACES / "female" / "039913.jpg", 256), face(FACES / "male" / "006930.jpg", 256)])
    with torch.no_grad():
        y = taef2.decode(taef2.encode(x))
    psnr = -10 * torch.log10(((y - x) ** 2).flatten(1).mean(1))
    assert psnr.min() > 34.0, psnr.tolist()


def test_create_vae_taef2_from_env_folder(taef2_files, monkeypatch):
    monkeypatch.setenv("UPBENCH_TAEF2_DIR", str(taef2_files[0].parent))
    vae = create_vae({"kind": "taef2"})
    assert isinstance(vae, TAEF2)


def test_create_vae_taef2_missing_files_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("UPBENCH_TAEF2_DIR", str(tmp_path))
    with pytest.raises(UpbenchError) as err:
        create_vae({"kind": "taef2"})
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "taef2_encoder.pth") in msg and str(tmp_path / "taef2_decoder.pth") in msg
    assert "backbone.encoder" in msg and "UPBENCH_TAEF2_DIR" in msg
    with pytest.raises(UpbenchError, match="no option"):
        create_vae({"kind": "taef2", "encoder_path": "x"})


# ------------------------------------------------------------------------------------------------------ SD 1.5
@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (the sd15 VAE needs it)")
def test_create_vae_sd15_offline_names_the_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    # Offline with an empty cache, whatever this machine has downloaded before.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UpbenchError) as err:
        create_vae({"kind": "sd15"})
    msg = str(err.value)
    assert "\n" not in msg and "weights" in msg
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "backbone.name_or_path" in msg


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (the sd15 VAE needs it)")
def test_sd15_wrapper_on_a_tiny_local_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    tiny = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    tiny.save_pretrained(tmp_path / "vae")  # laid out like the SD 1.5 repository
    vae = create_vae({"kind": "sd15", "name_or_path": str(tmp_path)})
    assert (vae.name, vae.latent_channels, vae.scale_factor) == ("sd15", 4, 8)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
        # [0, 1] images become [-1, 1]; latents are the posterior mean times 0.18215
        ref = tiny.encode(x * 2 - 1).latent_dist.mean * 0.18215
    assert z.shape == (1, 4, 4, 6) and torch.allclose(z, ref, atol=1e-6)
    assert y.shape == (1, 3, 32, 48) and 0 <= y.min() and y.max() <= 1
    assert create_vae({"kind": "sd15", "name_or_path": str(tmp_path / "vae")}) is not None  # the vae folder itself
