"""NAF (Chambon et al., arXiv 2511.18452): zero-shot feature upsampling by neighbourhood attention filtering.

No parameter touches the features, so one model serves any backbone and any channel count.  A two-branch image
encoder (1x1 "pixel" and 3x3 "semantic" convolutions) makes a 256-channel map; pooled to the output size and
rotated by an axial RoPE it is the query map, and its average over each feature cell is the key map.  Every output
pixel attends to the 9x9 low-resolution cells around it (cross-scale neighbourhood attention, 4 heads) and returns
their attention-weighted average of the raw features.  Module names equal the official ``valeoai/NAF`` state-dict
keys; the attention kernels live in :mod:`._naf_attention`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.errors import UpbenchError

from . import register
from ._naf_attention import (cross_scale_attention, dilation_for, natten_available, natten_cross_scale_attention,
                             natten_fits)
from .base import Upsampler, as_size
from .layers import LOW_PRECISION, conv

PAPER = "https://arxiv.org/abs/2511.18452"
_RELEASE = "https://github.com/valeoai/NAF/releases/download/model/naf_release.pth"
ATTENTION_BACKENDS = ("auto", "torch", "natten")


class EncBlock(nn.Module):
    """GroupNorm(8) -> SiLU -> Conv k x k -> GroupNorm(8) -> SiLU -> Conv k x k, reflect padding, biases, and no
    residual connection (NAF builds its blocks without one)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = conv(channels, channels, kernel_size, bias=True)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = conv(channels, channels, kernel_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


def branch(width: int, kernel_size: int, blocks: int) -> nn.Sequential:
    """Stem conv 3 -> width (bias, reflect) then ``blocks`` EncBlocks; no norm or activation around them."""
    return nn.Sequential(conv(3, width, kernel_size, bias=True), *[EncBlock(width, kernel_size) for _ in range(blocks)])


class AxialRoPE(nn.Module):
    """DINOv3's axial rotary encoding of a (B, dim, H, W) map, no learned weights.

    Heads are contiguous blocks of ``dim / heads`` channels.  Pixel centres map to (-1, 1) per axis; angle
    2 pi coord / period for the ``head_dim / 4`` periods ``base ** (k / (head_dim / 4))``, row angles then column
    angles, tiled twice over the head; rotation in pairs (a, a + head_dim / 2).  In training mode the coordinates
    are scaled by one random factor in [1/rescale, rescale] (log-uniform) per call, NAF's augmentation."""

    def __init__(self, dim: int, num_heads: int, base: float = 100.0, rescale: Optional[float] = 2.0):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise UpbenchError(f"naf: the RoPE head width dim/heads_rope = {dim}/{num_heads} must be a multiple of 4")
        self.num_heads, self.rescale = num_heads, rescale
        quarter = dim // num_heads // 4
        self.register_buffer("periods", base ** (2 * torch.arange(quarter, dtype=torch.float32) / (2 * quarter)))

    def angles(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row angles (P, h) and column angles (P, w) for the P periods, in ``dtype``: separable, so the (h * w, P)
        table of the official code is never built (its entries are the same numbers)."""
        ys = 2.0 * (torch.arange(0.5, h, device=device, dtype=dtype) / h) - 1.0
        xs = 2.0 * (torch.arange(0.5, w, device=device, dtype=dtype) / w) - 1.0
        if self.training and self.rescale:
            span = math.log(self.rescale)
            factor = torch.empty(1, device=device, dtype=dtype).uniform_(-span, span).exp()
            ys, xs = ys * factor, xs * factor
        periods = self.periods.to(dtype)[:, None]
        return 2 * math.pi * ys[None, :] / periods, 2 * math.pi * xs[None, :] / periods

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim, H, W) -> (B, dim, H, W).  Per head the first half of the channels is rotated against the second:
        out[a] = x[a] cos - x[a + half] sin, out[a + half] = x[a + half] cos + x[a] sin (the official
        ``x cos + rotate_half(x) sin``, term for term)."""
        b, c, h, w = x.shape
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        rows, cols = self.angles(h, w, x.device, work)
        p = rows.shape[0]
        cos = torch.cat([rows.cos()[:, :, None].expand(p, h, w), cols.cos()[:, None, :].expand(p, h, w)])
        sin = torch.cat([rows.sin()[:, :, None].expand(p, h, w), cols.sin()[:, None, :].expand(p, h, w)])
        first, second = x.to(work).reshape(b, self.num_heads, 2, 2 * p, h, w).unbind(2)
        out = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=2)
        return out.reshape(b, c, h, w).to(x.dtype)


class ImageEncoder(nn.Module):
    """``encoder`` (pixel branch, 1x1) and ``sem_encoder`` (semantic branch, 3x3) concatenated in that order, and
    the ``rope`` applied to their pooled map."""

    def __init__(self, dim: int, heads_rope: int, rope_base: float, rope_rescale: Optional[float], layers: int):
        super().__init__()
        self.encoder = branch(dim // 2, 1, layers)
        self.sem_encoder = branch(dim // 2, 3, layers)
        self.rope = AxialRoPE(dim, heads_rope, rope_base, rope_rescale)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.encoder(image), self.sem_encoder(image)], dim=1)


@register("naf")
class NAF(Upsampler):
    """NAF upsampler; works with any feature channel count divisible by ``heads_attn``.

    ``NAF(in_channels=None, patch_size=None, dim=256, heads_attn=4, heads_rope=4, kernel_size=9, rope_base=100.0,
    rope_rescale=2.0, img_layers=2, attention="auto")``, the official defaults (the released model).
    ``in_channels`` / ``patch_size`` are accepted for the harness; a given ``in_channels`` is only checked.
    ``attention``: ``torch`` (the exact pure-PyTorch kernel), ``natten`` (NATTEN's, where it imports and the size
    is within its limits), ``auto`` (NATTEN on CUDA when it imports and fits, else torch).
    """

    family = "local"
    licence = "Apache-2.0 (valeoai/NAF)"
    official_methods = ("NAF",)
    pretrained_cfgs: Dict[str, PretrainedCfg] = {
        "naf_release": PretrainedCfg(
            "naf_release", None, None, None,
            WeightSource(url=_RELEASE, licence="Apache-2.0",
                         notes="the released NAF (GitHub release 'model'); plain state dict"),
            PAPER, notes="trained on DINOv3 ViT-B/16 features, zero-shot for any backbone (pick it with "
                         "weights='naf_release')"),
    }
    pretrained_sources: Dict[str, WeightSource] = {name: cfg.source for name, cfg in pretrained_cfgs.items()}

    def __init__(self, in_channels: Optional[int] = None, patch_size: Optional[int] = None, dim: int = 256,
                 heads_attn: int = 4, heads_rope: int = 4, kernel_size: int = 9, rope_base: float = 100.0,
                 rope_rescale: Optional[float] = 2.0, img_layers: int = 2, attention: str = "auto"):
        super().__init__()
        if in_channels is not None and int(in_channels) % heads_attn:
            raise UpbenchError(f"naf: in_channels={in_channels} must be divisible by heads_attn={heads_attn} "
                               "(each head averages its own block of channels)")
        if dim % 2 or dim % heads_attn:
            raise UpbenchError(f"naf: dim={dim} must be even and divisible by heads_attn={heads_attn}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UpbenchError(f"naf: kernel_size must be odd and positive, got {kernel_size}")
        if attention not in ATTENTION_BACKENDS:
            raise UpbenchError(f"naf: attention={attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if attention == "natten" and not natten_available():
            raise UpbenchError("naf: attention='natten' needs the natten package (pip install natten); "
                               "attention='torch' needs nothing")
        self.in_channels, self.patch_size = in_channels, patch_size
        self.dim, self.heads_attn, self.kernel_size, self.attention = dim, heads_attn, kernel_size, attention
        self.image_encoder = ImageEncoder(dim, heads_rope, rope_base, rope_rescale, img_layers)

    # ----------------------------------------------------------------- forward
    def encoder_input(self, image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The image capped at 4x the output: when a side exceeds 4x its output side, both sides are shrunk to at most
        4x the *smaller* output side (bilinear, no antialias), as the official code does."""
        (ho, wo), (hi, wi) = size, image.shape[-2:]
        if hi > 4 * ho or wi > 4 * wo:
            cap = 4 * min(ho, wo)
            image = F.interpolate(image, size=(min(hi, cap), min(wi, cap)), mode="bilinear", align_corners=False)
        return image

    def queries_and_keys(self, image: torch.Tensor, size: Tuple[int, int], grid: Tuple[int, int]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The RoPE-rotated query map (B, dim, Ho, Wo) and its average over each feature cell (B, dim, h, w)."""
        enc = self.image_encoder(self.encoder_input(image, size))
        if tuple(enc.shape[-2:]) != size:   # pooling to the same size is the identity
            enc = F.adaptive_avg_pool2d(enc, size)
        queries = self.image_encoder.rope(enc)
        return queries, F.adaptive_avg_pool2d(queries, grid)

    def _use_natten(self, queries: torch.Tensor, grid: Tuple[int, int]) -> bool:
        if self.attention == "torch":
            return False
        size = tuple(queries.shape[-2:])
        fits = natten_fits(size, dilation_for(size, grid), self.kernel_size)
        if self.attention == "natten":
            return fits
        return fits and queries.device.type == "cuda" and natten_available()

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        size = as_size(output_size)
        out_dtype = features.dtype
        if features.shape[1] % self.heads_attn:
            raise UpbenchError(f"naf: the features have {features.shape[1]} channels, which is not divisible by "
                               f"heads_attn={self.heads_attn}; NAF splits the channels into that many heads")
        ref = self.image_encoder.rope.periods
        image = image.to(ref.device, next(self.parameters()).dtype)
        grid = tuple(features.shape[-2:])
        queries, keys = self.queries_and_keys(image, size, grid)
        values = features.to(queries.device, queries.dtype)
        scale = (self.dim / self.heads_attn) ** -0.5
        keys = keys.to(queries.dtype)
        if self._use_natten(queries, grid):
            try:
                return natten_cross_scale_attention(queries, keys, values, self.heads_attn, self.kernel_size,
                                                    scale).to(out_dtype)
            except (NotImplementedError, RuntimeError) as exc:   # no NATTEN backend for this device / head widths
                if self.attention == "natten":
                    raise UpbenchError(f"naf: NATTEN cannot run this call ({str(exc).splitlines()[0][:120]}); "
                                       "use upsampler.kwargs.attention=torch (same numbers)") from None
        out = cross_scale_attention(queries, keys, values, self.heads_attn, self.kernel_size, scale)
        return out.to(out_dtype)

    # ----------------------------------------------------------------- official interface
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "NAF":
        kw = dict(constructor)
        if not kw.pop("use_encoder", True):
            raise UpbenchError("naf: use_encoder=False (pooling the raw image) is not implemented; the released "
                               "model uses the encoder")
        kw.pop("name", None)
        kw.pop("use_semencoder", None)   # read by nothing in the official model
        allowed = {"dim", "heads_attn", "heads_rope", "kernel_size", "rope_base", "rope_rescale", "img_layers"}
        unknown = set(kw) - allowed
        if unknown:
            raise UpbenchError(f"naf: unsupported official constructor arguments {sorted(unknown)}")
        return cls(**kw)

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]
                     ) -> Dict[str, torch.Tensor]:
        """``model(image, features, output_size)`` (image first); also the pooled key map NAF attends to."""
        size = as_size(tuple(inputs["output_size"]))
        grid = tuple(inputs["features"].shape[-2:])
        _, keys = self.queries_and_keys(inputs["image"], size, grid)
        return {"output": self(inputs["image"], inputs["features"], size), "keys_pooled": keys}
