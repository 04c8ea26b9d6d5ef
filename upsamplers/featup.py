"""FeatUp JBU (``JBUStack``, mhamilton723/FeatUp, ICLR 2024), with a pure-PyTorch AdaptiveConv.

The official stack is called features-first and always returns 16·(h, w): four joint-bilateral stages, each doubling
the resolution under the guidance ``adaptive_avg_pool2d(image, (2h, 2w))``, then ``0.1·fixup_proj(x) + x``.
The adapter runs the stack and resizes to the requested ``output_size`` (bilinear, antialiased when shrinking).

Official checkpoints are Lightning files: ``state_dict`` → ``upsampler.*`` (the stack), ``model.1.norm.*`` (the
ChannelNorm that the hub's ``use_norm=True`` backbones apply to the features), plus featurizer / training-only keys
that are ignored here (as the official ``strict=False`` load ignores them).
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
from .layers import reflect_pad

_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/{sub}{name}_jbu_stack_cocostuff.ckpt"
PAPER = "https://arxiv.org/abs/2403.10516"
# FeatUp hub backbone name -> (feature channels, patch size (None: not a ViT), description, the backbone's name in
# PretrainedCfg (a timm name where FeatUp's features are timm's), other names); maskclip exists without ChannelNorm
_BACKBONES = {
    "dinov2": (384, 14, "DINOv2 ViT-S/14", "vit_small_patch14_dinov2.lvd142m", ("dinov2_s14", "dinov2_vits14")),
    "vit": (384, 16, "timm ViT-S/16 (vit_small_patch16_224)", "vit_small_patch16_224", ()),
    "dino16": (384, 16, "DINO ViT-S/16", "dino16", ()),
    "clip": (512, 16, "CLIP ViT-B/16", "clip", ()),
    "resnet50": (2048, None, "ResNet-50", "resnet50", ()),
    "maskclip": (512, 16, "MaskCLIP ViT-B/16", "maskclip", ()),
}


def _cfgs() -> Dict[str, PretrainedCfg]:
    out: Dict[str, PretrainedCfg] = {}
    for name, (channels, patch, desc, backbone, aliases) in _BACKBONES.items():
        variants = [(f"{name}_no_norm", "no_norm/", False)]
        if name != "maskclip":
            variants.insert(0, (name, "", True))
        for key, sub, norm in variants:
            source = WeightSource(
                url=_URL.format(sub=sub, name=name),
                licence="MIT (mhamilton723/FeatUp)",
                notes=(f"JBUStack trained on COCO-Stuff for the hub backbone '{name}' ({desc}, C={channels}); "
                       f"build with in_channels={channels}, use_norm={norm}"),
            )
            out[key] = PretrainedCfg(key, backbone, channels, patch, source, PAPER, kwargs={"use_norm": norm},
                                     backbone_aliases=tuple(dict.fromkeys(aliases + ((name,) if name != backbone
                                                                                      else ()))),
                                     notes=f"FeatUp hub backbone '{name}' ({desc})")
    return out


# ----------------------------------------------------------------------------- AdaptiveConv
def adaptive_conv(padded: torch.Tensor, kernel: torch.Tensor, block_rows: Optional[int] = None) -> torch.Tensor:
    """Per-pixel filtering: ``out[b,c,y,x] = sum_{i,j} padded[b,c,y+i,x+j] * K[b,y,x,i,j]``.

    ``padded`` (B, C, H+d-1, W+d-1); ``kernel`` (B, d*d, H, W) with channel ``i*d + j`` (i = row offset, j = column
    offset), i.e. ``K = kernel.permute(0, 2, 3, 1).reshape(B, H, W, d, d)``.  Accumulates over the d*d shifted views
    (optionally in blocks of ``block_rows`` output rows; default: the whole map at once) instead of materialising the
    (B, C, d*d, H, W) unfolded tensor, so the only large allocation is the output itself.
    """
    b, c, hp, wp = padded.shape
    kb, kk, h, w = kernel.shape
    d = int(round(kk ** 0.5))
    if d * d != kk or kb != b or hp != h + d - 1 or wp != w + d - 1:
        raise ValueError(f"adaptive_conv: padded {tuple(padded.shape)} and kernel {tuple(kernel.shape)} do not agree")
    kernel = kernel.to(padded.dtype)
    if block_rows is None or block_rows >= h:
        return _adaptive_conv_rows(padded, kernel, 0, h, d)
    out = padded.new_empty((b, c, h, w))
    for y0 in range(0, h, block_rows):
        y1 = min(h, y0 + block_rows)
        out[:, :, y0:y1] = _adaptive_conv_rows(padded, kernel, y0, y1, d)
    return out


def _adaptive_conv_rows(padded: torch.Tensor, kernel: torch.Tensor, y0: int, y1: int, d: int) -> torch.Tensor:
    """Output rows [y0, y1) of :func:`adaptive_conv`: acc = sum_p shifted_view_p * kernel_p (in place)."""
    w = kernel.shape[-1]
    acc: Optional[torch.Tensor] = None
    for p in range(d * d):
        i, j = divmod(p, d)
        src = padded[:, :, y0 + i:y1 + i, j:j + w]
        k = kernel[:, p:p + 1, y0:y1]
        if acc is None:
            acc = src * k
        else:
            acc.addcmul_(src, k)
    assert acc is not None
    return acc


def adaptive_conv_reference(padded: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The unfold/einsum definition of :func:`adaptive_conv` (memory hungry; for checks)."""
    b, c, hp, wp = padded.shape
    _, kk, h, w = kernel.shape
    d = int(round(kk ** 0.5))
    patches = F.unfold(padded, d).reshape(b, c, kk, h, w)
    return torch.einsum("bcphw,bphw->bchw", patches, kernel)


# ----------------------------------------------------------------------------- JBU stage
class JBULearnedRange(nn.Module):
    """One 2x joint-bilateral stage: learned range kernel x Gaussian spatial kernel (+ learned fixup)."""

    def __init__(self, feat_dim: int, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3):
        super().__init__()
        self.feat_dim, self.guidance_dim, self.key_dim = feat_dim, guidance_dim, key_dim
        self.radius = radius
        self.diameter = 2 * radius + 1
        k2 = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Dropout2d(0.1), nn.Conv2d(key_dim, key_dim, 1))
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + k2, k2, 1), nn.GELU(), nn.Dropout2d(0.1), nn.Conv2d(k2, k2, 1))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def range_kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """(B, d*d, H, W) softmax over the window of exp(range_temp)·<proj(centre), proj(neighbour)>."""
        _, _, h, w = guidance.shape
        r, d = self.radius, self.diameter
        proj = self.range_proj(guidance)
        padded = reflect_pad(proj, (r, r, r, r))
        logits = torch.stack([(padded[:, :, i:i + h, j:j + w] * proj).sum(1)
                              for i in range(d) for j in range(d)], dim=1)
        temp = self.range_temp.exp().clamp_min(1e-4).clamp_max(1e4)
        return F.softmax(temp * logits, dim=1)

    def spatial_kernel(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, d*d, 1, 1) Gaussian of the window offsets on linspace(-1, 1, d)."""
        d = self.diameter
        t = torch.linspace(-1, 1, d, device=device, dtype=dtype)
        dist2 = t.square()[:, None] + t.square()[None, :]
        return torch.exp(-dist2 / (2 * self.sigma_spatial ** 2)).reshape(1, d * d, 1, 1)

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        k = self.range_kernel(guidance) * self.spatial_kernel(guidance.device, guidance.dtype)
        k = k / k.sum(1, keepdim=True).clamp(1e-7)
        return k + 0.1 * self.fixup_proj(torch.cat([k, guidance], dim=1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        if source.shape[0] != guidance.shape[0]:
            raise ValueError(f"batch mismatch: features {tuple(source.shape)} vs guidance {tuple(guidance.shape)}")
        _, _, h, w = guidance.shape
        r = self.radius
        kernel = self.kernel(guidance)
        hr = F.interpolate(source, size=(h, w), mode="bicubic", align_corners=False)
        return adaptive_conv(reflect_pad(hr, (r, r, r, r)), kernel)


# ----------------------------------------------------------------------------- the upsampler
@register("featup")
class FeatUpJBU(Upsampler):
    """FeatUp ``JBUStack`` (4 JBU stages, 16x) + optional ChannelNorm on the incoming features.

    ``forward(image, features, output_size)``: (B,3,H,W) ImageNet-normalised image, (B,C,h,w) features →
    (B,C,*output_size).  The stack always computes 16·(h, w) and the result is resized bilinearly (antialiased when
    shrinking) to ``output_size``.  ``use_norm=True`` applies the LayerNorm-over-channels that the hub's
    ``use_norm=True`` backbones put before the upsampler (weights from ``model.1.norm.*``).
    """

    official_methods = ("FeatUp-JBU",)
    pretrained_cfgs = _cfgs()
    pretrained_sources = {name: cfg.source for name, cfg in pretrained_cfgs.items()}
    checkpoint_prefixes = ("module.",)
    checkpoint_strict = True  # training-only / featurizer keys are dropped explicitly in convert_official_state_dict
    stage_names = ("stage1_2x", "stage2_4x", "stage3_8x", "stage4_16x")

    def __init__(self, in_channels: int = 384, use_norm: bool = False, key_dim: int = 32, radius: int = 3,
                 guidance_dim: int = 3, patch_size: Optional[int] = None):
        super().__init__()
        self.in_channels = int(in_channels)
        self.use_norm = bool(use_norm)
        for k in range(1, 5):
            setattr(self, f"up{k}", JBULearnedRange(self.in_channels, guidance_dim, key_dim, radius))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(self.in_channels, self.in_channels, 1))
        self.norm = nn.LayerNorm(self.in_channels) if self.use_norm else None

    # ------------------------------------------------------------------ core
    def channel_norm(self, features: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return features
        return self.norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def stack(self, features: torch.Tensor, image: torch.Tensor,
              return_stages: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The official ``JBUStack.forward(source, guidance)`` (no ChannelNorm): 16·(h, w) output and stage outputs."""
        x = features
        stages: List[torch.Tensor] = []
        for k in range(1, 5):
            _, _, h, w = x.shape
            guidance = F.adaptive_avg_pool2d(image, (2 * h, 2 * w))
            x = getattr(self, f"up{k}")(x, guidance)
            if return_stages:
                stages.append(x)
        return self.fixup_proj(x) * 0.1 + x, stages

    def native_output_size(self, feature_size, output_size):
        return (16 * int(feature_size[0]), 16 * int(feature_size[1]))   # four 2x JBU stages

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        size = as_size(output_size)
        image = image.to(features.dtype)
        out, _ = self.stack(self.channel_norm(features), image)
        return resize(out, size, antialias="shrink")

    # ------------------------------------------------------------------ official weights
    def convert_official_state_dict(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if any(k.startswith("upsampler.") for k in sd):
            out: Dict[str, torch.Tensor] = {}
            for k, v in sd.items():
                if k.startswith("upsampler."):
                    out[k[len("upsampler."):]] = v
                elif k.startswith("model.1.norm."):
                    out["norm." + k[len("model.1.norm."):]] = v
                # model.0.* (featurizer), scale_net.*, downsampler.*: not part of the upsampler
            sd = out
        has_norm = any(k.startswith("norm.") for k in sd)
        if has_norm and not self.use_norm:
            raise UpbenchError("FeatUp checkpoint carries a ChannelNorm (model.1.norm.* / norm.*) but this model was "
                               "built with use_norm=False: build it with use_norm=True or use the '*_no_norm' weights")
        if self.use_norm and not has_norm and any(k.startswith("up1.") for k in sd):
            raise UpbenchError("FeatUp checkpoint has no ChannelNorm (model.1.norm.*) but this model was built with "
                               "use_norm=True: build it with use_norm=False or use the weights with norm")
        return sd

    # ------------------------------------------------------------------ golden reproduction
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "FeatUpJBU":
        if method not in cls.official_methods:
            raise UpbenchError(f"{cls.__name__} does not reproduce '{method}'")
        stage = dict(constructor.get("stage") or {})
        channels = constructor.get("feat_dim", constructor.get("in_channels", stage.get("feat_dim")))
        if int(stage.get("scale", 2)) != 2:
            raise UpbenchError("FeatUp JBU stages with scale != 2 are not supported")
        return cls(in_channels=int(channels), use_norm=bool(constructor.get("use_norm", False)),
                   key_dim=int(stage.get("key_dim", 32)), radius=int(stage.get("radius", 3)),
                   guidance_dim=int(stage.get("guidance_dim", 3)))

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        features, image = inputs["features"], inputs["image"]
        out, stages = self.stack(self.channel_norm(features), image, return_stages=True)
        result = dict(zip(self.stage_names, stages))
        result["output"] = out
        return result
