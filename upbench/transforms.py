"""Tensor transforms every part of upbench shares: normalisation and the one resize helper."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch.nn import functional as F

Antialias = Union[bool, str]


def normalize(image01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (x - mean) / std per channel."""
    m = torch.tensor(list(mean), dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
    return (image01 - m) / s


def resize(x: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear", antialias: Antialias = False) -> torch.Tensor:
    """``F.interpolate`` of a (B, C, H, W) float tensor to ``size`` with the suites' conventions: ``align_corners=False``
    for the linear modes; ``antialias`` True, False or ``"shrink"`` (only when a side gets smaller, as torchvision's
    resize of the official FeatUp / LiFT code does).  Returns ``x`` itself when it already has that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if antialias == "shrink":
        antialias = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if mode in ("nearest", "nearest-exact"):
        return F.interpolate(x, size=size, mode=mode)
    if antialias and size[1] == 1:
        # PyTorch resizes a contiguous map to width 1 differently from a channels-last one (the former is not the
        # separable filter); the official code sees contiguous maps, so use that layout
        x = x.contiguous()
    if antialias and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # PyTorch's CPU antialiased filter has no reduced-precision kernel: filter in float32, keep the dtype
        return F.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True).to(x.dtype)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=bool(antialias))
