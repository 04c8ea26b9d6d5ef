"""torch.hub entry points: one per upsampler, each ``upbench.upsamplers.create(name, pretrained, backbone, **kwargs)``::

    model = torch.hub.load("<owner>/upbench", "uplift", pretrained=True, backbone="vit_small_patch14_dinov2.lvd142m")
    model = torch.hub.load("/path/to/checkout", "uplift", source="local", pretrained=True, backbone="demo")

Works with upbench installed or from a plain checkout: the checkout's ``upsamplers/`` folder is the package
``upbench.upsamplers`` only through the install's package mapping, so without an install the checkout root is
appended to ``upbench.__path__`` (``upbench.upsamplers`` -> ``<checkout>/upsamplers``, likewise ``configs/``).
"""
import importlib.util
import os

dependencies = ["torch", "safetensors", "yaml", "huggingface_hub"]

import upbench  # noqa: E402  (torch.hub puts the checkout first on sys.path; importing upbench does not import torch)

if importlib.util.find_spec("upbench.upsamplers") is None:   # a plain checkout, not installed
    upbench.__path__.append(os.path.dirname(os.path.abspath(__file__)))


def _create(name, pretrained, backbone, kwargs):
    from upbench import upsamplers

    return upsamplers.create(name, pretrained=pretrained, backbone=backbone, **kwargs)


def uplift(pretrained=False, backbone=None, **kwargs):
    """UPLiFT; official weights for DINOv2-S/14, DINOv3-S+/16 and upbench's ``demo`` backbone."""
    return _create("uplift", pretrained, backbone, kwargs)


def uplift_vae(pretrained=False, backbone=None, **kwargs):
    """UPLiFT for Stable Diffusion 1.5 VAE latents; official weights for ``sd15_vae``."""
    return _create("uplift_vae", pretrained, backbone, kwargs)


def jafar(pretrained=False, backbone=None, **kwargs):
    """JAFAR; official weights for seven timm ViTs (``upsamplers.pretrained_cfgs("jafar")``)."""
    return _create("jafar", pretrained, backbone, kwargs)


def anyup(pretrained=False, backbone=None, **kwargs):
    """AnyUp (any feature channels); ``weights="anyup_multi_backbone"`` for the multi-backbone checkpoint."""
    return _create("anyup", pretrained, backbone, kwargs)


def loftup(pretrained=False, backbone=None, **kwargs):
    """LoftUp; official weights for DINOv2 S/B (with and without registers), CLIP, SigLIP, SigLIP2."""
    return _create("loftup", pretrained, backbone, kwargs)


def featup(pretrained=False, backbone=None, **kwargs):
    """FeatUp JBU stack; official weights for FeatUp's hub backbones (DINOv2-S/14 first)."""
    return _create("featup", pretrained, backbone, kwargs)


def lift(pretrained=False, backbone=None, **kwargs):
    """LiFT, iterated to the output size; official weights (DINO v1) must be downloaded by hand: ``weights=``."""
    return _create("lift", pretrained, backbone, kwargs)


def lift_2x(pretrained=False, backbone=None, **kwargs):
    """LiFT, one 2x step then bilinear; the same weights as ``lift``."""
    return _create("lift_2x", pretrained, backbone, kwargs)


def bilinear(pretrained=False, backbone=None, **kwargs):
    """Bilinear interpolation (no weights)."""
    return _create("bilinear", pretrained, backbone, kwargs)


def nearest(pretrained=False, backbone=None, **kwargs):
    """Nearest-exact interpolation (no weights)."""
    return _create("nearest", pretrained, backbone, kwargs)


def lowres(pretrained=False, backbone=None, **kwargs):
    """No upsampling: the probe reads the low-resolution features (no weights)."""
    return _create("lowres", pretrained, backbone, kwargs)


def input2x(pretrained=False, backbone=None, **kwargs):
    """The "2x larger input" baseline (no weights)."""
    return _create("input2x", pretrained, backbone, kwargs)


def naf(pretrained=False, backbone=None, **kwargs):
    """NAF, zero-shot for any backbone; ``pretrained=True`` loads the released model (``naf_release``)."""
    return _create("naf", pretrained, backbone, kwargs)


def jbf(pretrained=False, backbone=None, **kwargs):
    """Joint bilateral filter of 4x bilinear features under the image, NAF's classical baseline (no weights)."""
    return _create("jbf", pretrained, backbone, kwargs)


def guided_filter(pretrained=False, backbone=None, **kwargs):
    """He et al.'s guided filter of bilinear features under the image's luma (no weights)."""
    return _create("guided_filter", pretrained, backbone, kwargs)


def bicubic(pretrained=False, backbone=None, **kwargs):
    """Bicubic interpolation (no weights)."""
    return _create("bicubic", pretrained, backbone, kwargs)
