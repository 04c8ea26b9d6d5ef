"""Figure helpers shared by the figure commands and the tasks that draw: a PCA fitted jointly on several feature
maps (so that one colour means one direction in feature space in every panel), panels of images, and saving a
figure as PNG and PDF.  Matplotlib runs headless (Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class JointPCA:
    """The first ``k`` principal directions of the vectors of several (C, H, W) maps taken together
    (``torch.pca_lowrank`` on a random subset of at most ``max_samples`` vectors from each map), and a colour scale
    shared by all of them (1st-99th percentile of the projections), so panels can be compared colour for colour."""

    def __init__(self, maps: Sequence[torch.Tensor], k: int = 3, max_samples: int = 20000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        samples = []
        for m in maps:
            v = m.detach().float().cpu().flatten(1).T            # (H*W, C)
            if v.shape[0] > max_samples:
                v = v[torch.randperm(v.shape[0], generator=g)[:max_samples]]
            samples.append(v)
        x = torch.cat(samples)
        self.mean = x.mean(0, keepdim=True)
        torch.manual_seed(seed)   # pca_lowrank's random projection
        _, _, v = torch.pca_lowrank(x - self.mean, q=min(k, x.shape[1]), center=False)
        self.basis = v[:, :k]
        proj = (x - self.mean) @ self.basis
        self.lo = torch.quantile(proj, 0.01, dim=0)
        self.hi = torch.quantile(proj, 0.99, dim=0)

    def project(self, m: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> (H, W, k) projections."""
        v = m.detach().float().cpu().flatten(1).T
        return ((v - self.mean) @ self.basis).reshape(m.shape[1], m.shape[2], -1)

    def rgb(self, m: torch.Tensor) -> np.ndarray:
        """(C, H, W) -> (H, W, 3) colours in [0, 1] on the shared scale."""
        p = (self.project(m) - self.lo) / (self.hi - self.lo).clamp(min=1e-8)
        return p.clamp(0, 1).numpy()


def to_display(image01: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) numpy."""
    return image01.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def nearest_up(m: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A low-res (C, h, w) map blown up to ``size`` with nearest (blocks stay blocks in a figure)."""
    return torch.nn.functional.interpolate(m[None].float(), size=size, mode="nearest")[0]


def panels(images: Sequence[Tuple[str, np.ndarray]], stem: Path, ncols: Optional[int] = None, title: str = "",
           scale: float = 2.4, cmap: Optional[str] = None) -> List[str]:
    """A grid of images with their titles, saved as ``stem``.png and .pdf."""
    plt = pyplot()
    n = len(images)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, (scale + 0.25) * nrows + (0.4 if title else 0)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, img) in zip(axes.flat, images):
        ax.imshow(img, cmap=cmap if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def save(fig, stem: Path, dpi: int = 130) -> List[str]:
    """``stem``.png and ``stem``.pdf; returns both paths."""
    plt = pyplot()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(str(path))
    plt.close(fig)
    return paths
