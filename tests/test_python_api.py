"""The timm-style Python API: available / create(pretrained, backbone, weights) / pretrained_cfgs, constructor
arguments, torch.hub entries (installed and from a plain checkout) and save_pretrained / from_pretrained."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import randomise
from upbench import checkpoints, upsamplers
from upbench.errors import UpbenchError
from upbench.registry import UPSAMPLERS

ROOT = Path(__file__).resolve().parents[1]
LEARNED = [n for n in upsamplers.available() if not upsamplers.get(n).parameter_free]
SMALL = {"uplift": dict(in_channels=16, patch_size=14), "uplift_vae": dict(in_channels=8, arch="uplift_vae_small"),
         "jafar": dict(in_channels=32), "anyup": dict(), "loftup": dict(in_channels=12),
         "featup": dict(in_channels=16, use_norm=True), "lift": dict(in_channels=16, patch_size=14),
         "lift_2x": dict(in_channels=16, patch_size=16), "naf": dict(in_channels=16)}


# ----------------------------------------------------------------------------------------------- available
def test_available_filters_by_pattern_and_official_weights():
    everything = upsamplers.available()
    assert everything == UPSAMPLERS.available() and {"bilinear", "uplift", "jafar"} <= set(everything)
    assert upsamplers.available("up*") == ["uplift", "uplift_vae"]
    assert upsamplers.available("up*", pretrained=True) == ["uplift", "uplift_vae"]
    assert upsamplers.available(["*lift", "jaf?r"]) == ["jafar", "lift", "uplift"]
    with_weights = upsamplers.available(pretrained=True)
    assert {"uplift", "jafar", "anyup", "loftup", "featup", "lift"} <= set(with_weights)
    assert not {"bilinear", "nearest", "lowres", "input2x"} & set(with_weights)
    assert all(upsamplers.pretrained_cfgs(n) for n in with_weights)


# ----------------------------------------------------------------------------------------------- constructor arguments
def test_unknown_arguments_are_refused_with_the_valid_ones():
    with pytest.raises(UpbenchError) as err:
        upsamplers.create("bilinear", foo=1)
    assert str(err.value) == "bilinear: unknown argument 'foo'; valid arguments: in_channels, patch_size"
    for name in ("uplift", "lift"):   # their constructors used to swallow anything
        with pytest.raises(UpbenchError, match=r"unknown argument 'pretrained'.*arguments of upsamplers.create"):
            upsamplers.get(name)(pretrained=True)
    with pytest.raises(UpbenchError, match=r"jafar: unknown argument 'qk_dims'; valid arguments: .*qk_dim"):
        upsamplers.create("jafar", qk_dims=64)
    with pytest.raises(UpbenchError, match="takes at most 2 positional"):
        upsamplers.get("bilinear")(1, 2, 3)


@pytest.mark.parametrize("name", upsamplers.available())
def test_every_upsampler_takes_in_channels_and_patch_size(name):
    model = upsamplers.create(name, in_channels=8, patch_size=16, **({"arch": "uplift_vae_small"}
                                                                      if name == "uplift_vae" else {}))
    y = model.eval()(torch.randn(1, 3, 32, 32), torch.randn(1, 8, 2, 2), (8, 8))
    assert y.shape == (1, 8, 8, 8)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "upsampler").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_upsampler_config_builds(path):
    cfg = yaml.safe_load(path.read_text())
    model = UPSAMPLERS.create(cfg["name"], in_channels=384, patch_size=16 if cfg["name"] != "uplift_vae" else 8,
                              **(cfg.get("kwargs") or {}))
    assert model.registry_name == cfg["name"]
    assert cfg.get("weights") in (None, "demo") or cfg["weights"] in model.pretrained_cfgs


def test_the_renamed_uplift_argument_names_its_new_name():
    with pytest.raises(UpbenchError) as err:
        upsamplers.create("uplift_vae", config="uplift_vae_small")
    msg = str(err.value)
    assert "'config' is now called 'arch'" in msg and "upsampler.kwargs.arch=uplift_vae_small" in msg
    assert "\n" not in msg
    model = upsamplers.create("uplift_vae", arch="uplift_vae_small", in_channels=32)
    assert model.arch_name == "uplift_vae_small"


def test_an_old_config_override_names_the_new_key():
    """``upbench run upsampler=uplift_vae +upsampler.kwargs.config=...`` (the old key) fails with the new one."""
    from types import SimpleNamespace

    from upbench.config import compose, to_container
    from upbench.pipeline import build_upsampler

    cfg = to_container(compose(["upsampler=uplift_vae", "+upsampler.kwargs.config=uplift_vae_small"]))
    assert cfg["upsampler"]["kwargs"]["config"] == "uplift_vae_small"
    with pytest.raises(UpbenchError, match=r"now called 'arch'.*upsampler\.kwargs\.arch=uplift_vae_small"):
        build_upsampler(cfg["upsampler"], SimpleNamespace(channels=32, patch_size=8), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- pretrained cfgs
def test_pretrained_cfgs_describe_every_official_checkpoint():
    for name in upsamplers.available(pretrained=True):
        cls = upsamplers.get(name)
        for tag, cfg in upsamplers.pretrained_cfgs(name).items():
            assert cfg.tag == tag and cls.pretrained_sources[tag] is cfg.source
            assert cfg.paper.startswith("https://arxiv.org/abs/") and cfg.licence
            assert len(cfg.image_mean) == len(cfg.image_std) == 3
            json.dumps(cfg.to_dict())
            assert set(cfg.kwargs) <= set(upsamplers.accepted_arguments(cls)[0])
    assert upsamplers.pretrained_cfgs("loftup")["loftup_dinov2s"].licence.startswith("unstated")
    uplift = upsamplers.pretrained_cfgs("uplift")["uplift_dinov2-s14"]
    assert (uplift.backbone, uplift.in_channels, uplift.patch_size, uplift.licence) == \
        ("vit_small_patch14_dinov2.lvd142m", 384, 14, "MIT")
    assert uplift.url == "hf://UPLiFT-upsampler/uplift_dinov2-s14/uplift_dinov2-s14.safetensors"
    clip = upsamplers.pretrained_cfgs("jafar")["vit_base_patch16_clip_384"]
    assert (clip.in_channels, clip.patch_size) == (768, 16) and clip.image_mean[0] == pytest.approx(0.48145466)


def test_backbone_names_pick_the_checkpoint():
    pick = upsamplers.pretrained_cfg
    assert pick("uplift", "dinov2_s14").tag == pick("uplift", "vit_small_patch14_dinov2.lvd142m").tag == \
        "uplift_dinov2-s14"
    assert pick("uplift", "dinov3_splus16").tag == "uplift_dinov3-splus16"
    assert pick("uplift", "demo").tag == "demo" and pick("uplift_vae", "sd15_vae").tag == "uplift_sd1.5vae"
    assert pick("jafar", "dinov2_s14").tag == "vit_small_patch14_dinov2.lvd142m"
    assert pick("featup", "dinov2_s14").kwargs == {"use_norm": True}
    assert pick("featup", weights="dinov2_no_norm").kwargs == {"use_norm": False}
    assert pick("featup").tag == "dinov2" and pick("bilinear", "dinov2_s14") is None
    with pytest.raises(UpbenchError) as err:
        pick("uplift", "vit_base_patch16_clip_384")
    msg = str(err.value)
    assert "no official weights for backbone 'vit_base_patch16_clip_384'" in msg
    assert all(b in msg for b in ("vit_small_patch14_dinov2.lvd142m", "vit_small_plus_patch16_dinov3.lvd1689m", "demo"))
    with pytest.raises(UpbenchError, match="anyup_multi_backbone"):
        pick("anyup", "vit_base_patch16_clip_384")
    with pytest.raises(UpbenchError, match="trained on vit_small_patch14_dinov2.lvd142m, not on backbone 'demo'"):
        pick("jafar", "demo", weights="vit_small_patch14_dinov2.lvd142m")


def test_create_without_weights_takes_channels_from_the_backbone():
    assert upsamplers.create("jafar", backbone="dinov2_s14").in_channels == 384
    assert upsamplers.create("jafar", backbone="vit_base_patch16_clip_384").in_channels == 768
    m = upsamplers.create("uplift", backbone="dinov3_splus16")
    assert (m.in_channels, m.patch_size, m.arch_name) == (384, 16, "uplift_dinov3-splus16")
    assert m.pretrained_cfg is None
    assert upsamplers.create("jafar", backbone="demo", in_channels=7).in_channels == 7   # explicit wins
    with pytest.raises(UpbenchError, match="unknown backbone 'no_such_vit': pass in_channels="):
        upsamplers.create("jafar", backbone="no_such_vit")
    assert upsamplers.create("bilinear", backbone="no_such_vit").registry_name == "bilinear"


def test_pretrained_demo_backbone_loads_the_packaged_checkpoint_offline():
    model = upsamplers.create("uplift", pretrained=True, backbone="demo")
    assert model.pretrained_cfg.tag == "demo" and (model.in_channels, model.patch_size) == (112, 16)
    ref = upsamplers.get("uplift")(in_channels=112, patch_size=16).load_official("demo")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(UpbenchError, match=r"in_channels=384 does not fit the official weights 'demo' \(112"):
        upsamplers.create("uplift", pretrained=True, backbone="demo", in_channels=384)


@pytest.mark.parametrize("name,backbone", [("uplift", "dinov2_s14"), ("jafar", "vit_base_patch16_clip_384"),
                                           ("featup", "dinov2_s14"), ("loftup", "dinov2_s14"),
                                           ("anyup", "dinov2_s14"), ("lift", "dino_vits8")])
def test_pretrained_configures_the_model_for_its_checkpoint(name, backbone, tmp_path, monkeypatch):
    """The download is replaced by a file of the right architecture: create builds what the checkpoint needs and
    loads it strictly, and records the checkpoint and its normalisation."""
    cfg = upsamplers.pretrained_cfg(name, backbone)
    args = {k: v for k, v in (("in_channels", cfg.in_channels), ("patch_size", cfg.patch_size)) if v is not None}
    ref = randomise(upsamplers.get(name)(**args, **cfg.kwargs), seed=3)
    path = tmp_path / "official.pth"
    torch.save(ref.state_dict(), path)
    asked = []
    monkeypatch.setattr(checkpoints, "download", lambda source, what, local="": asked.append(source) or str(path))
    model = upsamplers.create(name, pretrained=True, backbone=backbone)
    assert asked == [cfg.source] and model.pretrained_cfg is cfg
    assert (tuple(model.image_mean), tuple(model.image_std)) == (tuple(cfg.image_mean), tuple(cfg.image_std))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    local = upsamplers.create(name, pretrained=True, backbone=backbone, weights=str(path))   # offline: a local copy
    assert len(asked) == 1 and local.pretrained_cfg is cfg


LONG_REASON = ("network is unreachable while resolving the address of the server because the resolver of this "
               "machine answered that no route to the host exists and nothing could be fetched\nsecond line")


def _long_error(*args, **kwargs):
    raise OSError(LONG_REASON)


@pytest.mark.parametrize("name,backbone", [("uplift", "dinov2_s14"), ("jafar", "dinov2_s14")])
def test_offline_download_is_one_clear_line(name, backbone, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _long_error)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _long_error)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UpbenchError) as err:
        upsamplers.create(name, pretrained=True, backbone=backbone)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"could not download {name} weights")
    assert "weights=/path/to/file" in msg and "upsampler.weights=/path/to/file" in msg
    cut = re.search(r"OSError: (.*?) \.\.\.\)", msg)
    assert cut and LONG_REASON.startswith(cut.group(1) + " ")   # cut after a whole word


def test_a_method_without_official_weights_says_so():
    assert upsamplers.create("bilinear", pretrained=True).pretrained_cfg is None   # nothing to load
    with pytest.raises(UpbenchError, match="lift weights 'dino_vits16' cannot be downloaded automatically.*weights="):
        upsamplers.create("lift", pretrained=True, backbone="dino_vits16")


# ----------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", LEARNED)
def test_save_pretrained_round_trip(name, tmp_path):
    kwargs = SMALL[name]
    model = randomise(upsamplers.create(name, **kwargs), seed=1)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: config[k] for k in kwargs} == kwargs
    again = upsamplers.get(name).from_pretrained(tmp_path / "saved")
    assert type(again) is type(model) and not again.training
    c = getattr(model, "in_channels", None) or 16
    image, feats = torch.randn(1, 3, 48, 40), torch.randn(1, c, 3, 3)
    outs = []
    for m in (model, again):
        torch.manual_seed(0)   # UPLiFT-VAE draws noise channels
        with torch.no_grad():
            outs.append(m(image, feats, (20, 24)))
    assert torch.equal(outs[0], outs[1])
    folder = upsamplers.create(name, weights=str(tmp_path / "saved"), **kwargs)   # a saved folder is weights= too
    for k, v in model.state_dict().items():
        assert torch.equal(folder.state_dict()[k], v), k


def test_save_pretrained_keeps_the_image_normalisation(tmp_path):
    """JAFAR on CLIP features expects CLIP's normalisation, which ``create`` sets on the instance: it survives a
    save / load; UPLiFT takes it as a constructor argument."""
    clip = upsamplers.pretrained_cfg("jafar", "vit_base_patch16_clip_384")
    model = upsamplers.create("jafar", backbone="vit_base_patch16_clip_384", qk_dim=32)
    model.image_mean, model.image_std = clip.image_mean, clip.image_std
    model.save_pretrained(tmp_path / "jafar")
    again = upsamplers.get("jafar").from_pretrained(tmp_path / "jafar")
    assert (again.image_mean, again.image_std) == (clip.image_mean, clip.image_std) and again.qk_dim == 32
    plain = upsamplers.create("jafar", in_channels=8)
    plain.save_pretrained(tmp_path / "plain")
    assert "image_mean" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert tuple(upsamplers.get("jafar").from_pretrained(tmp_path / "plain").image_mean) == (0.485, 0.456, 0.406)
    uplift = upsamplers.create("uplift", in_channels=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    uplift.save_pretrained(tmp_path / "uplift")
    assert upsamplers.get("uplift").from_pretrained(tmp_path / "uplift").image_std == (0.5, 0.5, 0.5)


def test_from_pretrained_errors_are_clear(tmp_path):
    model = upsamplers.create("jafar", in_channels=16)
    model.save_pretrained(tmp_path / "j")
    with pytest.raises(UpbenchError, match=r"in_channels=8|shape mismatches"):
        upsamplers.get("jafar").from_pretrained(tmp_path / "j", in_channels=8)
    with pytest.raises(UpbenchError, match="cannot load 'nobody/no-such-upsampler'"):
        upsamplers.get("jafar").from_pretrained("nobody/no-such-upsampler")


# ----------------------------------------------------------------------------------------------- torch.hub
def _hubconf():
    spec = importlib.util.spec_from_file_location("upbench_hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_has_an_entry_per_upsampler():
    hub = _hubconf()
    entries = {n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_")}
    assert entries == set(upsamplers.available())
    assert all(importlib.util.find_spec(d) for d in hub.dependencies)


def test_torch_hub_load_local():
    model = torch.hub.load(str(ROOT), "uplift", source="local", pretrained=True, backbone="demo")
    assert model.pretrained_cfg.tag == "demo"
    plain = torch.hub.load(str(ROOT), "jafar", source="local", backbone="dinov2_s14", qk_dim=64)
    assert plain.in_channels == 384 and plain.qk_dim == 64


NOT_INSTALLED = """
import importlib.util, sys
# forget the editable install of this environment: only the checkout itself can provide upbench
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "_EditableFinder"]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__qualname__", "").lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("upbench") is None
import torch
model = torch.hub.load(sys.argv[1], "uplift", source="local", pretrained=True, backbone="demo")
import upbench.upsamplers
print(upbench.upsamplers.__file__, model.pretrained_cfg.tag, model.in_channels)
"""


def test_torch_hub_load_from_a_checkout_without_install(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", NOT_INSTALLED, str(ROOT)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, tag, channels = proc.stdout.split()
    assert Path(path) == ROOT / "upsamplers" / "__init__.py" and (tag, channels) == ("demo", "112")
