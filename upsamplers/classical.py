"""Training-free baselines from classical image processing: the joint bilateral filter of NAF's model wrapper
(``jbf``), He et al.'s guided filter (``guided_filter``) and bicubic interpolation (``bicubic``).  None has
weights; the image guides the filtering of bilinearly upsampled features."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from upbench.errors import UpbenchError

from . import register
from .base import Upsampler, _Interpolate, as_size, query_chunk, use_device_path

#: CPU path: elements of one channel chunk's largest intermediate
_CPU_CHUNK_ELEMENTS = 1 << 24
#: ITU-R BT.601 luma weights (R, G, B): the guidance of the guided filter
LUMA = (0.299, 0.587, 0.114)


def _channel_chunk(x: torch.Tensor, per_channel: int) -> int:
    """Channels per chunk: one piece on the accelerator path unless free memory is short; bounded on the CPU."""
    c = x.shape[1]
    if use_device_path(x):
        return query_chunk(c, per_channel * x.element_size(), x.device)
    return max(1, min(c, _CPU_CHUNK_ELEMENTS // max(1, per_channel)))


def _by_channels(fn, x: torch.Tensor, per_channel: int) -> torch.Tensor:
    step = _channel_chunk(x, per_channel)
    if step >= x.shape[1]:
        return fn(x)
    return torch.cat([fn(x[:, s:s + step]) for s in range(0, x.shape[1], step)], dim=1)


# ------------------------------------------------------------------------------------------------------------- JBF
def gaussian_1d(size: int, sigma: float, device=None, dtype=None) -> torch.Tensor:
    """Normalised Gaussian taps at offsets -size//2 .. size//2 (+0.5 for even sizes), as kornia builds them."""
    x = torch.arange(size, device=device, dtype=dtype) - float(size // 2)
    if size % 2 == 0:
        x = x + 0.5
    taps = torch.exp(-x.pow(2.0) / (2 * sigma ** 2))
    return taps / taps.sum(-1, keepdim=True)


def joint_bilateral_filter(signal: torch.Tensor, guidance: torch.Tensor, kernel_size: int, sigma_color: float,
                           sigma_spatial: float) -> torch.Tensor:
    """Joint bilateral filter of ``signal`` (B, C, H, W) under ``guidance`` (B, G, H, W): reflect borders, a
    separable normalised Gaussian spatial kernel, and a colour kernel exp(-0.5 D^2 / sigma_color^2) with D the L1
    colour distance summed over the guidance channels (kornia's ``joint_bilateral_blur`` with its defaults)."""
    pad = kernel_size // 2
    unfold = (lambda t: F.pad(t, (pad, pad, pad, pad), mode="reflect")
              .unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).flatten(-2))   # (B, C, H, W, k * k)
    diff = unfold(guidance) - guidance.unsqueeze(-1)
    colour = (-0.5 / sigma_color ** 2 * diff.abs().sum(1, keepdim=True).square()).exp()
    taps = gaussian_1d(kernel_size, sigma_spatial, signal.device, signal.dtype)
    spatial = (taps[:, None] * taps[None, :]).reshape(1, 1, 1, 1, -1)
    kernel = spatial * colour
    norm = kernel.sum(-1)
    return _by_channels(lambda s: (unfold(s) * kernel).sum(-1) / norm, signal,
                        signal.shape[-2] * signal.shape[-1] * kernel_size ** 2)


@register("jbf")
class JointBilateralFilter(Upsampler):
    """JBF, the classical baseline of NAF's wrapper (``src/model/jbf.py``): features bilinearly upsampled x4, a
    ``kernel_size`` joint bilateral filter under the image resized to that grid, then bilinear to the output size.

    ``JointBilateralFilter(in_channels=None, patch_size=None, kernel_size=5, sigma_color=0.1, sigma_spatial=1.5)``
    (NAF's defaults).  The colour distance is measured on the normalised image (ImageNet statistics), as in NAF.
    """

    parameter_free = True
    family = "classical"
    licence = "Apache-2.0 (valeoai/NAF; the filter follows kornia's joint_bilateral_blur, Apache-2.0)"
    official_methods = ("JBF",)
    #: the grid the filter runs on, relative to the features (fixed at 4 in NAF's code)
    upscale = 4

    def __init__(self, in_channels: Optional[int] = None, patch_size: Optional[int] = None, kernel_size: int = 5,
                 sigma_color: float = 0.1, sigma_spatial: float = 1.5):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UpbenchError(f"jbf: kernel_size must be odd and positive, got {kernel_size}")
        if sigma_color <= 0 or sigma_spatial <= 0:
            raise UpbenchError(f"jbf: sigma_color and sigma_spatial must be positive, got {sigma_color}, "
                               f"{sigma_spatial}")
        self.kernel_size, self.sigma_color, self.sigma_spatial = kernel_size, float(sigma_color), float(sigma_spatial)

    def native_output_size(self, feature_size, output_size):
        return (self.upscale * int(feature_size[0]), self.upscale * int(feature_size[1]))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        size = as_size(output_size)
        signal = F.interpolate(features, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        guidance = F.interpolate(image.to(signal.device, signal.dtype), size=tuple(signal.shape[-2:]),
                                 mode="bilinear", align_corners=False)
        out = joint_bilateral_filter(signal, guidance, self.kernel_size, self.sigma_color, self.sigma_spatial)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "JointBilateralFilter":
        kw = dict(constructor)
        unknown = set(kw) - {"kernel_size", "sigma_color", "sigma_spatial"}
        if unknown:
            raise UpbenchError(f"jbf: unsupported official constructor arguments {sorted(unknown)}")
        return cls(**kw)

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]
                     ) -> Dict[str, torch.Tensor]:
        return {"output": self(inputs["image"], inputs["features"], tuple(inputs["output_size"]))}


# --------------------------------------------------------------------------------------------------- guided filter
def _box_axis(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Mean over [i - r, i + r] along ``dim``, clipped to the axis: O(1) per element from a running sum (kept in
    double precision by PyTorch's CPU kernel, then differenced)."""
    n = x.shape[dim]
    r = min(radius, n - 1)
    if r == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [1, 0]
    total = F.pad(x.cumsum(dim), pad)   # total[k] = sum of x[:k]
    upper = torch.cat([total.narrow(dim, r + 1, n - r), total.narrow(dim, n, 1).expand_as(total.narrow(dim, 0, r))],
                      dim)   # total[min(i + r + 1, n)]
    lower = torch.cat([total.narrow(dim, 0, 1).expand_as(total.narrow(dim, 0, r)), total.narrow(dim, 0, n - r)],
                      dim)   # total[max(i - r, 0)]
    count = _window_counts(n, r, x.device, x.dtype)
    return (upper - lower) / count.view([-1] + [1] * (x.dim() - 1 - dim % x.dim()))


_COUNTS: Dict[Tuple[int, int, str, torch.dtype], torch.Tensor] = {}


def _window_counts(n: int, r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pixels inside each clipped window of an axis of ``n``, built once per shape and device."""
    key = (n, r, str(device), dtype)
    if key not in _COUNTS:
        i = torch.arange(n, device=device)
        if len(_COUNTS) > 256:
            _COUNTS.clear()
        _COUNTS[key] = ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(dtype)
    return _COUNTS[key]


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) window around each pixel, the window clipped at the borders (the mean of the
    pixels inside the image, as He et al.'s O(1) box filter divided by the pixel count)."""
    if radius <= 0:
        return x
    return _box_axis(_box_axis(x, radius, -2), radius, -1)


def guided_filter(guide: torch.Tensor, signal: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter (Algorithm 1 of "Guided Image Filtering", TPAMI 2013) of every channel of
    ``signal`` (B, C, H, W) under a one-channel ``guide`` (B, 1, H, W): per window a linear model
    q = a I + b with a = cov(I, p) / (var(I) + eps), b = mean(p) - a mean(I); the output averages the models of
    every window that covers the pixel, mean(a) I + mean(b)."""
    mean_i, mean_ii = box_mean(torch.cat([guide, guide * guide], dim=1), radius).chunk(2, dim=1)
    denominator = torch.addcmul(mean_ii, mean_i, mean_i, value=-1) + eps   # var(I) + eps

    def filtered(p: torch.Tensor) -> torch.Tensor:
        mean_p = box_mean(p, radius)
        a = torch.addcmul(box_mean(guide * p, radius), mean_i, mean_p, value=-1) / denominator
        b = torch.addcmul(mean_p, a, mean_i, value=-1)
        return torch.addcmul(box_mean(b, radius), box_mean(a, radius), guide)

    return _by_channels(filtered, signal, 8 * signal.shape[-2] * signal.shape[-1])


@register("guided_filter")
class GuidedFilter(Upsampler):
    """Guided filter upsampling: the features are upsampled bilinearly to the output size, then every channel is
    guided-filtered (He et al., O(1) box filters) under the image's luma at the output size.

    ``GuidedFilter(in_channels=None, patch_size=None, radius=8, eps=1e-2)``.  The guidance: the image is taken back
    to [0, 1] RGB with the model's ``image_mean`` / ``image_std`` (ImageNet by default, what the pipeline
    normalises with), converted to BT.601 luma 0.299 R + 0.587 G + 0.114 B and resized to the output size
    (bilinear, antialiased when shrinking).  ``radius`` is in output pixels; ``eps`` is in squared luma units
    (edges whose local luma standard deviation is well above sqrt(eps) = 0.1 are kept)."""

    parameter_free = True
    family = "classical"
    licence = "MIT (upbench's implementation of He et al., TPAMI 2013)"

    def __init__(self, in_channels: Optional[int] = None, patch_size: Optional[int] = None, radius: int = 8,
                 eps: float = 1e-2):
        super().__init__()
        if int(radius) != radius or radius < 0:
            raise UpbenchError(f"guided_filter: radius must be a whole number of pixels >= 0, got {radius}")
        if not eps > 0:
            raise UpbenchError(f"guided_filter: eps must be positive, got {eps} (e.g. upsampler.kwargs.eps=1e-2)")
        self.radius, self.eps = int(radius), float(eps)

    def guidance(self, image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, 1, Ho, Wo) luma in [0, 1] units."""
        # sum_c w_c (x_c std_c + mean_c): Python scalars only, so nothing is copied to the device per call
        scales = [w * s for w, s in zip(LUMA, self.image_std)]
        offset = sum(w * m for w, m in zip(LUMA, self.image_mean))
        luma = image[:, 0:1] * scales[0] + image[:, 1:2] * scales[1] + image[:, 2:3] * scales[2] + offset
        if tuple(luma.shape[-2:]) == size:
            return luma
        shrink = luma.shape[-2] > size[0] or luma.shape[-1] > size[1]
        return F.interpolate(luma, size=size, mode="bilinear", align_corners=False, antialias=shrink)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        size = as_size(output_size)
        signal = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        guide = self.guidance(image.to(signal.device, signal.dtype), size)
        return guided_filter(guide, signal, self.radius, self.eps)


# -------------------------------------------------------------------------------------------------------- bicubic
@register("bicubic")
class Bicubic(_Interpolate):
    """``F.interpolate(mode="bicubic", align_corners=False)``, no antialias (PyTorch's cubic convolution,
    a = -0.75)."""

    mode = "bicubic"
