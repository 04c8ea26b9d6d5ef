"""LiFT (saksham-s/lift, ECCV 2024): a light 2x feature upsampler guided by a small image CNN.

Two variants share one state-dict layout:
  * ``official`` (patch 8 / 16): the image branch ends with a fixed scale adapter — identity for patch 8,
    ``MaxPool2d(2, 2)`` for patch 16 — so the image must be exactly ``patch·(h, w)``;
  * ``loftup14`` (the patch-14 port in andrehuang/loftup): the scale adapter is ``adaptive_max_pool2d(·, (2h, 2w))``,
    so any image size works.

One module call doubles the feature grid.  Registered adapters:
  * ``lift``    — iterative use as in ``lift_extractor``: apply the module k times (k = doublings needed to reach
    ``output_size``), doubling the guidance image bilinearly before each further iteration, then resize to
    ``output_size`` (bilinear, antialiased when shrinking);
  * ``lift_2x`` — one call, then plain bilinear (align_corners=False) to ``output_size``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.errors import UpbenchError
from upbench.transforms import resize

from . import register
from .base import Upsampler, as_size

_DRIVE_NOTE = ("official LiFT release file '{file}' ({desc}; DINO v1 last-layer *key* features, C={c}, patch {p}) "
               "is only on Google Drive (link in the README of https://github.com/saksham-s/lift), with no stable "
               "direct URL: download it by hand and build with in_channels={c}, patch_size={p}")


PAPER = "https://arxiv.org/abs/2403.14625"


def _cfgs() -> Dict[str, PretrainedCfg]:
    """The official releases; the backbone names are those of facebookresearch/dino's torch.hub entries, and the
    features are that ViT's last-layer *key* facet (not its output tokens)."""
    table = {
        "dino_vits16": ("lift_dino_vits16.pth", "DINO ViT-S/16", 384, 16),
        "dino_vits8": ("lift_dino_vits8.pth", "DINO ViT-S/8", 384, 8),
        "dino_vitb16": ("lift_dino_vitb16.pth", "DINO ViT-B/16", 768, 16),
        "dino_vitb8": ("lift_dino_vitb8.pth", "DINO ViT-B/8", 768, 8),
    }
    return {name: PretrainedCfg(name, name, c, p, WeightSource(url=None, licence="MIT (saksham-s/lift)",
                                                                notes=_DRIVE_NOTE.format(file=f, desc=d, c=c, p=p)),
                                PAPER, notes=f"{d} last-layer key features; Google Drive only (download by hand)")
            for name, (f, d, c, p) in table.items()}


class DoubleConv(nn.Module):
    """(Conv3x3 no bias → BN → ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """ConvTranspose2d(in → in//2, k2, s2), concatenated with the image map, then DoubleConv → out."""

    def __init__(self, in_channels: int, out_channels: int, image_channels: int = 32):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv_1 = DoubleConv(in_channels // 2 + image_channels, out_channels)

    def forward(self, x: torch.Tensor, image_map: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != image_map.shape[-2:]:
            raise ValueError(f"LiFT: upsampled features {tuple(x.shape[-2:])} and image map "
                             f"{tuple(image_map.shape[-2:])} differ; the image must be patch_size x the feature grid")
        return self.conv_1(torch.cat([x, image_map], dim=1))


def _variant_for(patch_size: int, variant: Optional[str]) -> str:
    if variant in (None, "auto"):
        return "official" if int(patch_size) in (8, 16) else "loftup14"
    if variant not in ("official", "loftup14"):
        raise UpbenchError(f"LiFT: unknown variant '{variant}' (use 'official', 'loftup14' or None for automatic)")
    if variant == "official" and int(patch_size) not in (8, 16):
        raise UpbenchError(f"LiFT: the official module exists for patch 8 and 16 only, not {patch_size}; "
                           f"use variant='loftup14' (adaptive max-pool scale adapter)")
    return variant


@register("lift")
class LiFT(Upsampler):
    """LiFT, iterative: k module calls (image doubled before each further call), then resize to ``output_size``.

    ``LiFT(in_channels, patch_size, variant=None)``; ``variant`` None picks ``official`` for patch 8/16 and
    ``loftup14`` (adaptive max-pool adapter) otherwise.  At least one call is always made.
    """

    iterative = True
    official_methods = ("LiFT", "LiFT-loftup14")
    pretrained_cfgs = _cfgs()
    pretrained_sources = {name: cfg.source for name, cfg in pretrained_cfgs.items()}
    checkpoint_prefixes = ("module.",)
    checkpoint_strict = True
    image_channels = 32

    def __init__(self, in_channels: int = 384, patch_size: int = 16, variant: Optional[str] = None):
        super().__init__()
        c, ic = int(in_channels), self.image_channels
        if c < 2:
            raise UpbenchError(f"LiFT: in_channels must be at least 2 (its decoder has in_channels // 2 channels), "
                               f"got {c}")
        self.in_channels = c
        self.patch_size = int(patch_size)
        self.variant = _variant_for(self.patch_size, variant)
        self.image_convs_1 = nn.Sequential(
            nn.Conv2d(3, ic, 3, stride=2, padding=1), nn.BatchNorm2d(ic), nn.ReLU(inplace=True),
            nn.Conv2d(ic, ic, 3, stride=2, padding=1), nn.BatchNorm2d(ic), nn.ReLU(inplace=True))
        if self.variant == "official":
            self.scale_adapter: nn.Module = nn.Identity() if self.patch_size == 8 else nn.MaxPool2d(2, 2)
        else:
            self.scale_adapter = nn.Identity()  # replaced by adaptive_max_pool2d in module_forward
        self.image_convs_2 = nn.Sequential(
            nn.Conv2d(ic, ic, 3, stride=2, padding=1), nn.BatchNorm2d(ic), nn.ReLU(inplace=True))
        self.up1 = Up(c + ic, c // 2, ic)
        self.outc = nn.Conv2d(c // 2, c, 1)

    # ------------------------------------------------------------------ one module call (maps in, maps out)
    def module_forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """One 2x step: (B,C,h,w) features + image → (B,C,2h,2w)."""
        _, _, h, w = features.shape
        imgs_1 = self.image_convs_1(image)
        if self.variant == "official":
            imgs_1 = self.scale_adapter(imgs_1)
        else:
            imgs_1 = F.adaptive_max_pool2d(imgs_1, (2 * h, 2 * w))
        imgs_2 = self.image_convs_2(imgs_1)
        if imgs_2.shape[-2:] != features.shape[-2:]:
            raise ValueError(f"LiFT ({self.variant}, patch {self.patch_size}): image {tuple(image.shape[-2:])} gives an "
                             f"image map of {tuple(imgs_2.shape[-2:])}, features are {(h, w)}")
        x = torch.cat([features, imgs_2], dim=1)
        return self.outc(self.up1(x, imgs_1))

    def first_image(self, image: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """The guidance image of the first call: patch·(h, w) for the official module; as given for the port."""
        if self.variant != "official":
            return image
        size = (self.patch_size * grid[0], self.patch_size * grid[1])
        return resize(image, size, antialias="shrink")

    def iterate(self, image: torch.Tensor, features: torch.Tensor, iters: int,
                fit_image: bool = True) -> List[torch.Tensor]:
        """``iters`` calls as in ``lift_extractor``: the image is doubled (bilinear) before every further call."""
        x = features
        img = self.first_image(image, tuple(features.shape[-2:])) if fit_image else image
        img = img.to(features.dtype)
        steps: List[torch.Tensor] = []
        for i in range(iters):
            x = self.module_forward(x, img)
            steps.append(x)
            if i + 1 < iters:
                img = F.interpolate(img, size=(2 * img.shape[-2], 2 * img.shape[-1]), mode="bilinear",
                                    align_corners=False)
        return steps

    def forward_steps(self, image: torch.Tensor, features: torch.Tensor, iters: int = 1) -> List[torch.Tensor]:
        """Every 2x step's output for ``iters`` steps (the harness's view of :meth:`iterate`)."""
        return self.iterate(image, features, iters)

    @staticmethod
    def doublings(grid: Tuple[int, int], size: Tuple[int, int]) -> int:
        """Smallest k ≥ 1 with 2^k·(h, w) ≥ size on both sides."""
        k = 1
        while (grid[0] << k) < size[0] or (grid[1] << k) < size[1]:
            k += 1
        return k

    def native_output_size(self, feature_size, output_size):
        k = self.doublings(tuple(feature_size), as_size(output_size))
        return (int(feature_size[0]) << k, int(feature_size[1]) << k)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        size = as_size(output_size)
        k = self.doublings(tuple(features.shape[-2:]), size)
        return resize(self.iterate(image, features, k)[-1], size, antialias="shrink")

    # ------------------------------------------------------------------ golden reproduction
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "LiFT":
        if method == "LiFT":
            variant = "official"
        elif method == "LiFT-loftup14":
            variant = "loftup14"
        else:
            raise UpbenchError(f"{cls.__name__} does not reproduce '{method}'")
        return cls(in_channels=int(constructor["in_channels"]), patch_size=int(constructor["patch_size"]),
                   variant=variant)

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """The official iteration: ``lift_k`` after every call and ``output``; tokens in/out when pre/post_shape."""
        image, feats = inputs["image"], inputs["features"]
        iters = int(constructor.get("iters", 1))
        default_shape = method == "LiFT"  # official file: pre_shape=post_shape=True; LoftUp port: False
        pre = bool(constructor.get("pre_shape", default_shape))
        post = bool(constructor.get("post_shape", default_shape))
        result: Dict[str, torch.Tensor] = {}
        x = feats
        img = image
        for i in range(iters):
            if pre:  # tokens (B,T,C) → maps with h = int(H/patch), w = int(W/patch), row-major
                b, _, c = x.shape
                h, w = int(img.shape[-2] / self.patch_size), int(img.shape[-1] / self.patch_size)
                x = x.permute(0, 2, 1).reshape(b, c, h, w)
            x = self.module_forward(x, img)
            if post:
                x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            result[f"lift_{i + 1}"] = x
            if i + 1 < iters:
                img = F.interpolate(img, size=(2 * img.shape[-2], 2 * img.shape[-1]), mode="bilinear",
                                    align_corners=False)
        result["output"] = x
        return result


@register("lift_2x")
class LiFT2x(LiFT):
    """LiFT, a single 2x call, then plain bilinear (align_corners=False, no antialias) to ``output_size``."""

    official_methods = ()
    iterative = False

    def native_output_size(self, feature_size, output_size):
        return (2 * int(feature_size[0]), 2 * int(feature_size[1]))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        size = as_size(output_size)
        return resize(self.iterate(image, features, 1)[-1], size)
