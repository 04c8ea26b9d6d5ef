"""AnyUp (Wimmer et al., arXiv 2510.12764): a channel-agnostic JAFAR successor.  A learned feature-unification
layer turns any number of feature channels into a fixed-size key code, and each output pixel attends only to the
low-resolution keys inside a +-``window_ratio`` window around it.  Module names equal the official
``wimmerth/anyup`` state-dict keys (standard, non-NATTEN path)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.errors import UpbenchError

from . import register
from .base import Upsampler
from .layers import CrossAttentionBlock, HeadAveragedAttention, PooledCrossAttentionUpsampler, ResBlock, RoPE, conv

_RELEASE = "https://github.com/wimmerth/anyup/releases/download/"
PAPER = "https://arxiv.org/abs/2510.12764"


def make_encoder(first: nn.Module, dim: int) -> nn.Sequential:
    """``first`` followed by two 1x1 ResBlocks in the packed ``block`` layout."""
    return nn.Sequential(first, ResBlock(dim, 1, layout="sequential"), ResBlock(dim, 1, layout="sequential"))


class LearnedFeatureUnification(nn.Module):
    """Channel-agnostic feature code.

    Every input channel is convolved (zero padding k//2) with each of the ``out_channels`` learned k x k filters in
    ``basis``; the responses are divided by the number of in-image pixels under the window, reinterpreted by a
    plain row-major reshape as (B, out_channels, C, h, w), soft-maxed over the filter axis and averaged over C.
    """

    def __init__(self, out_channels: int, kernel_size: int = 5):
        super().__init__()
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.basis = nn.Parameter(torch.randn(out_channels, 1, kernel_size, kernel_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        pad = self.kernel_size // 2
        weight = self.basis.to(features.dtype).repeat(c, 1, 1, 1)
        resp = F.conv2d(features, weight, padding=pad, groups=c)  # channel index = c * out + k
        ones = features.new_ones(1, 1, h, w)
        count = F.conv2d(ones, features.new_ones(1, 1, self.kernel_size, self.kernel_size), padding=pad)
        resp = resp / count
        resp = resp.reshape(b, self.out_channels, c, h, w)
        return resp.softmax(dim=1).mean(dim=2)


@lru_cache(maxsize=32)
def _window_bounds(n_out: int, n_in: int, ratio: float, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    pos = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) / n_out
    lo = torch.clamp(pos - ratio, 0, 1)
    hi = torch.clamp(pos + ratio, 0, 1)
    return torch.floor(lo * n_in).long(), torch.ceil(hi * n_in).long()


def window_1d(n_out: int, n_in: int, ratio: float, device=None) -> torch.Tensor:
    """(n_out, n_in) bool, True where low-res index r is ALLOWED for output index i:
    floor(clamp(pos - ratio) * n_in) <= r < ceil(clamp(pos + ratio) * n_in), pos = (i + 0.5) / n_out (float32)."""
    start, stop = _window_bounds(int(n_out), int(n_in), float(ratio), str(torch.device(device or "cpu")))
    idx = torch.arange(n_in, device=start.device)
    return (idx[None] >= start[:, None]) & (idx[None] < stop[:, None])


def window_mask(out_size: Tuple[int, int], in_size: Tuple[int, int], ratio: float, device=None,
                rows: Optional[slice] = None) -> torch.Tensor:
    """Attention mask (n, h*w) for the flattened query grid ``out_size`` (rows ``rows`` of it, all by default)
    against the flattened key grid ``in_size``: True = NOT allowed (``nn.MultiheadAttention`` bool semantics)."""
    (ho, wo), (h, w) = out_size, in_size
    row_ok = window_1d(ho, h, ratio, device)
    col_ok = window_1d(wo, w, ratio, device)
    q = torch.arange(ho * wo, device=row_ok.device)
    if rows is not None:
        q = q[rows]
    allowed = row_ok[q // wo][:, :, None] & col_ok[q % wo][:, None, :]
    return ~allowed.reshape(q.numel(), h * w)


class CrossAttention(nn.Module):
    def __init__(self, qk_dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(qk_dim)
        self.norm_k = nn.RMSNorm(qk_dim)
        self.attention = HeadAveragedAttention(qk_dim, num_heads)


@register("anyup")
class AnyUp(PooledCrossAttentionUpsampler, Upsampler):
    """AnyUp upsampler; works with any feature channel count at inference.

    ``AnyUp(in_channels=None, patch_size=None, input_dim=3, qk_dim=128, kernel_size=1, kernel_size_lfu=5,
    window_ratio=0.1, num_heads=4, lfu_dim=None, q_chunk_size=None)``. ``in_channels`` / ``patch_size`` are
    accepted for the harness and ignored. ``q_chunk_size`` (also a per-call argument) chunks the queries to bound
    memory; None = automatic (about 128 MB of float32 logits per chunk). The output does not depend on it.
    """

    family = "cross-attention"

    official_methods = ("AnyUp",)
    pretrained_cfgs: Dict[str, PretrainedCfg] = {
        # channel-agnostic: in_channels None (any); both work with any backbone's features
        "anyup_paper": PretrainedCfg(
            "anyup_paper", "vit_small_patch14_dinov2.lvd142m", None, 14,
            WeightSource(url=_RELEASE + "checkpoint/anyup_paper.pth", licence="CC-BY-4.0",
                         notes="paper model, trained on DINOv2 ViT-S/14 features; plain state dict"),
            PAPER, backbone_aliases=("dinov2_s14", "dinov2_vits14")),
        "anyup_multi_backbone": PretrainedCfg(
            "anyup_multi_backbone", None, None, None,
            WeightSource(url=_RELEASE + "checkpoint_v2/anyup_multi_backbone.pth", licence="CC-BY-4.0",
                         notes="trained on DINOv2-S, DINOv2-S-reg, CLIP-B, SigLIP-B and ViT-B features; "
                               "plain state dict"),
            PAPER, notes="trained on several backbones (DINOv2-S, DINOv2-S-reg, CLIP-B, SigLIP-B, ViT-B): pick it "
                         "with weights='anyup_multi_backbone'"),
    }
    pretrained_sources: Dict[str, WeightSource] = {name: cfg.source for name, cfg in pretrained_cfgs.items()}

    def __init__(self, in_channels: Optional[int] = None, patch_size: Optional[int] = None, input_dim: int = 3,
                 qk_dim: int = 128, kernel_size: int = 1, kernel_size_lfu: int = 5, window_ratio: float = 0.1,
                 num_heads: int = 4, lfu_dim: Optional[int] = None, q_chunk_size: Optional[int] = None,
                 init_gaussian_derivatives: bool = False, use_natten: bool = False):
        super().__init__()
        if use_natten:
            raise UpbenchError("anyup: the NATTEN variant (use_natten=True) is not implemented; "
                               "it does not reproduce the paper model")
        if init_gaussian_derivatives:
            raise UpbenchError("anyup: init_gaussian_derivatives=True is not implemented (training-time init only)")
        lfu_dim = lfu_dim or qk_dim
        self.qk_dim, self.window_ratio, self.q_chunk_size = qk_dim, window_ratio, q_chunk_size
        self.image_encoder = make_encoder(conv(input_dim, qk_dim, kernel_size), qk_dim)
        self.key_encoder = make_encoder(conv(qk_dim, qk_dim, 1), qk_dim)
        self.query_encoder = make_encoder(conv(qk_dim, qk_dim, 1), qk_dim)
        self.key_features_encoder = make_encoder(LearnedFeatureUnification(lfu_dim, kernel_size_lfu), lfu_dim)
        self.aggregation = make_encoder(conv(qk_dim + lfu_dim, qk_dim, 3), qk_dim)
        self.cross_decode = CrossAttentionBlock(CrossAttention(qk_dim, num_heads), qk_dim, mask=self.window)
        self.rope = RoPE(qk_dim)

    def window(self, out_size, in_size, device, rows: slice) -> torch.Tensor:
        """The +-window_ratio mask (True = masked) for the query rows ``rows``."""
        return window_mask(out_size, in_size, self.window_ratio, device, rows=rows)

    def queries(self, enc: torch.Tensor, size) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.query_encoder(enc), size)

    def keys(self, enc: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        keys = F.adaptive_avg_pool2d(self.key_encoder(enc), features.shape[-2:])
        return self.aggregation(torch.cat([keys, self.key_features_encoder(F.normalize(features, dim=1))], dim=1))

    # ----------------------------------------------------------------- official interface
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "AnyUp":
        kw = dict(constructor)
        allowed = {"input_dim", "qk_dim", "kernel_size", "kernel_size_lfu", "window_ratio", "num_heads",
                   "init_gaussian_derivatives", "use_natten", "lfu_dim"}
        unknown = set(kw) - allowed
        if unknown:
            raise UpbenchError(f"anyup: unsupported official constructor arguments {sorted(unknown)}")
        return cls(**kw)
