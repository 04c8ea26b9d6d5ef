"""VAE-latent super-resolution (UPLiFT Table 4, following FM-Boost): for every validation image, the high-res
centre crop is downsampled by ``factor`` (bilinear, antialiased), encoded by the VAE backbone, its latents are
upsampled by ``factor`` with the upsampler (guidance: the low-res image), decoded, colour-corrected, and compared
with the high-res crop: SSIM / PSNR per image, FID / patch-FID over the set."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch
from torch.nn import functional as F

from upbench import image_metrics
from upbench.errors import UpbenchError

from . import register
from .common import normalize, timing_summary


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H / factor, W / factor), bilinear with antialiasing (torchvision's resize)."""
    H, W = image.shape[-2:]
    if H % factor or W % factor:
        raise UpbenchError(f"generative: image size {(H, W)} is not a multiple of factor {factor}")
    return F.interpolate(image, size=(H // factor, W // factor), mode="bilinear", align_corners=False, antialias=True)


def super_resolve(backbone, upsampler, lr: torch.Tensor, factor: int, color_correction: bool = True,
                  timings: Optional[List[float]] = None) -> torch.Tensor:
    """Encode ``lr`` (B, 3, h, w) in [0, 1], upsample the latents ``factor`` x, decode; [0, 1] output."""
    with torch.inference_mode():
        z, _ = backbone(normalize(lr, backbone.mean, backbone.std))
        guide = normalize(lr, upsampler.image_mean, upsampler.image_std)
        t0 = time.perf_counter()
        zu = upsampler(guide, z, (z.shape[-2] * factor, z.shape[-1] * factor))
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        out = backbone.decode(zu).clamp(0, 1)
        return image_metrics.color_correct(out, lr) if color_correction else out


@register("generative")
def run_generative(cfg: Dict[str, Any], backbone, upsampler, train_set, val_set, device: torch.device, cache,
                   log=print) -> Dict[str, Any]:
    if not hasattr(backbone, "decode"):
        raise UpbenchError(f"task=generative needs a VAE backbone (backbone=taef2 or backbone=sd15_vae), "
                           f"got '{backbone.name}'")
    if getattr(val_set, "kind", None) != "images":
        raise UpbenchError("task=generative needs an image set (dataset=faceshq, lhq, demo_images or "
                           "image_folder with dataset.root=...)")
    factor = int(cfg["factor"])
    sr, hr, up_s = [], [], []
    for i in range(len(val_set)):
        image = val_set[i]["image"][None].to(device)
        out = super_resolve(backbone, upsampler, downsample(image, factor), factor, bool(cfg["color_correction"]),
                            up_s)
        if out.shape != image.shape:
            raise UpbenchError(f"generative: decoded size {tuple(out.shape)} != high-res crop {tuple(image.shape)}")
        sr.append(out[0].cpu())
        hr.append(image[0].cpu())
        if (i + 1) % 10 == 0:
            log(f"  {i + 1}/{len(val_set)} images")
    metrics = image_metrics.summary(sr, hr, int(cfg["pfid_patch"]), with_fid=bool(cfg["fid"]))
    return {
        "metrics": metrics,
        "timing": {"upsampler_ms": timing_summary(up_s)},
        "data": {"n_val": len(val_set), "hr_size": val_set.img_size, "lr_size": val_set.img_size // factor,
                 "factor": factor, "fid_resize": image_metrics.FID_RESIZE_MODE if cfg["fid"] else None,
                 "pfid_patch": int(cfg["pfid_patch"]), "color_correction": bool(cfg["color_correction"])},
    }
