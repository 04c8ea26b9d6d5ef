"""JAFAR (Couairon et al., arXiv 2506.11136): global cross-attention from image-derived queries at the output
resolution to low-resolution keys modulated by the backbone features; the output is the head-averaged attention
applied to the raw features.  Module names equal the official ``PaulCouairon/JAFAR`` state-dict keys."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.errors import UpbenchError

from . import register
from .base import Upsampler
from .layers import CrossAttentionBlock, HeadAveragedAttention, PooledCrossAttentionUpsampler, ResBlock, RoPE, conv

_RELEASE = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights/{}.pth"
PAPER = "https://arxiv.org/abs/2506.11136"
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
#: timm backbone names with a released JAFAR checkpoint (README of PaulCouairon/JAFAR): (channels, patch, the
#: image normalisation = that backbone's timm data config, which JAFAR's probe feeds to backbone and upsampler alike,
#: other names of the same timm weights)
_BACKBONES = {
    "vit_small_patch14_dinov2.lvd142m": (384, 14, _IMAGENET, ("dinov2_s14",)),
    "vit_base_patch14_dinov2.lvd142m": (768, 14, _IMAGENET, ()),
    "vit_small_patch14_reg4_dinov2": (384, 14, _IMAGENET, ("vit_small_patch14_reg4_dinov2.lvd142m",)),
    "vit_base_patch16_224": (768, 16, _HALF, ("vit_base_patch16_224.augreg2_in21k_ft_in1k",)),
    "vit_base_patch16_224.dino": (768, 16, _IMAGENET, ()),
    "vit_base_patch16_clip_384": (768, 16, _CLIP, ("vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",)),
    "vit_base_patch16_siglip_512.v2_webli": (768, 16, _HALF, ()),
}
JAFAR_BACKBONES = tuple(_BACKBONES)


def make_encoder(in_ch: int, dim: int, kernel_size: int = 1) -> nn.Sequential:
    """Conv(in -> dim, kernel k, reflect, no bias) followed by two 1x1 ResBlocks (norm1/conv1/norm2/conv2 keys)."""
    return nn.Sequential(conv(in_ch, dim, kernel_size), ResBlock(dim, 1, layout="named"), ResBlock(dim, 1, layout="named"))


class SFTModulation(nn.Module):
    """Spatial feature transform: ``gamma(F) * GroupNorm(x) + beta(F)`` (GroupNorm without affine)."""

    def __init__(self, dim: int, num_groups: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, dim, affine=False)
        self.gamma = nn.Conv2d(dim, dim, 1, bias=False)
        self.beta = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.gamma(cond) * self.norm(x) + self.beta(cond)


class CrossAttention(nn.Module):
    """RMSNorm'd queries/keys; head-averaged weights of an ``nn.MultiheadAttention(qk_dim, heads, vdim=C)``."""

    def __init__(self, qk_dim: int, v_dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(qk_dim)
        self.norm_k = nn.RMSNorm(qk_dim)
        self.norm_v = nn.RMSNorm(v_dim)  # part of the official module; the output uses the raw values
        self.attention = HeadAveragedAttention(qk_dim, num_heads, vdim=v_dim)


@register("jafar")
class JAFAR(PooledCrossAttentionUpsampler, Upsampler):
    """JAFAR upsampler.

    ``JAFAR(in_channels=384, patch_size=None, input_dim=3, qk_dim=128, kernel_size=1, num_heads=4,
    q_chunk_size=None)``; ``in_channels`` is the official ``v_dim`` (= ``feature_dim``). ``q_chunk_size`` only
    bounds memory (None = automatic, so that one chunk's attention logits stay around 128 MB in float32); the
    output does not depend on it.
    """

    family = "cross-attention"

    official_methods = ("JAFAR",)
    checkpoint_wrappers = ("jafar",)
    pretrained_cfgs: Dict[str, PretrainedCfg] = {
        name: PretrainedCfg(
            name, name, c, p,
            WeightSource(url=_RELEASE.format(name), licence="Apache-2.0",
                         notes=f"JAFAR trained on timm '{name}' features; checkpoint dict key 'jafar'"),
            PAPER, image_mean=norm[0], image_std=norm[1], backbone_aliases=aliases)
        for name, (c, p, norm, aliases) in _BACKBONES.items()
    }
    pretrained_sources: Dict[str, WeightSource] = {name: cfg.source for name, cfg in pretrained_cfgs.items()}

    def __init__(self, in_channels: int = 384, patch_size: Optional[int] = None, input_dim: int = 3,
                 qk_dim: int = 128, kernel_size: int = 1, num_heads: int = 4,
                 q_chunk_size: Optional[int] = None):
        super().__init__()
        self.in_channels, self.qk_dim, self.q_chunk_size = in_channels, qk_dim, q_chunk_size
        self.image_encoder = make_encoder(input_dim, qk_dim, kernel_size)
        self.key_encoder = make_encoder(qk_dim, qk_dim, 1)
        self.query_encoder = make_encoder(qk_dim, qk_dim, 1)
        self.key_features_encoder = make_encoder(in_channels, qk_dim, 1)
        self.cross_decode = CrossAttentionBlock(CrossAttention(qk_dim, in_channels, num_heads), qk_dim)
        self.norm = nn.GroupNorm(8, qk_dim, affine=False)
        self.sft_key = SFTModulation(qk_dim)
        self.rope = RoPE(qk_dim)

    def check_features(self, features: torch.Tensor) -> None:
        if features.shape[1] != self.in_channels:
            raise UpbenchError(f"jafar: built for {self.in_channels} feature channels, got {features.shape[1]}")

    def queries(self, enc: torch.Tensor, size) -> torch.Tensor:
        return self.norm(F.adaptive_avg_pool2d(self.query_encoder(enc), size))

    def keys(self, enc: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        keys = F.adaptive_avg_pool2d(self.key_encoder(enc), features.shape[-2:])
        return self.sft_key(keys, self.key_features_encoder(F.normalize(features, dim=1)))

    # ----------------------------------------------------------------- official interface
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "JAFAR":
        kw = dict(constructor)
        v_dim = int(kw.pop("v_dim", kw.get("feature_dim", 384)))
        feature_dim = int(kw.pop("feature_dim", v_dim))
        if feature_dim != v_dim:
            raise UpbenchError(f"jafar: feature_dim {feature_dim} != v_dim {v_dim} is not supported "
                               "(the values are the features themselves)")
        allowed = {"input_dim", "qk_dim", "kernel_size", "num_heads"}
        unknown = set(kw) - allowed
        if unknown:
            raise UpbenchError(f"jafar: unsupported official constructor arguments {sorted(unknown)}")
        return cls(in_channels=v_dim, **kw)
