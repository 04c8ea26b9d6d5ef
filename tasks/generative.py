"""VAE-latent super-resolution (UPLiFT Table 4, following FM-Boost): for every validation image, the high-res
centre crop is downsampled by ``factor`` (bilinear, antialiased), encoded by the VAE backbone, its latents are
upsampled by ``factor`` with the upsampler (guidance: the low-res image), decoded, colour-corrected, and compared
with the high-res crop: SSIM / PSNR per image, FID / patch-FID over the set."""
from __future__ import annotations

from typing import Any, Dict

import torch

from upbench import image_metrics
from upbench.progress import bar
from upbench.errors import UpbenchError
from upbench.protocols import Job, Metric, Pipeline, TableSpec, Task
from upbench.transforms import resize

from . import register


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H / factor, W / factor), bilinear with antialiasing (torchvision's resize)."""
    H, W = image.shape[-2:]
    if H % factor or W % factor:
        raise UpbenchError(f"generative: image size {(H, W)} is not a multiple of factor {factor}")
    return resize(image, (H // factor, W // factor), antialias=True)


def super_resolve(pipe: Pipeline, lr: torch.Tensor, factor: int, color_correction: bool = True) -> torch.Tensor:
    """Encode ``lr`` (B, 3, h, w) in [0, 1], upsample the latents ``factor`` x, decode; [0, 1] output."""
    z, _ = pipe.encode(lr)
    zu = pipe.upsample(lr, z, (z.shape[-2] * factor, z.shape[-1] * factor))
    out = pipe.decode(zu).clamp(0, 1)
    return image_metrics.color_correct(out, lr) if color_correction else out


@register("generative")
class LatentSuperResolution(Task):
    dataset_kinds = ("images",)
    dataset_hint = "an image set (dataset=faceshq, lhq, demo_images or image_folder with dataset.root=...)"
    table = TableSpec(
        title="VAE-latent super-resolution",
        metrics=(Metric("ssim", "SSIM", "max", "{:.3f}"), Metric("psnr", "PSNR"), Metric("fid", "FID", "min"),
                 Metric("pfid", "p-FID", "min")),
        paper={"sd15_vae": "table4"},
        group_by=("backbone", "config.protocol.name"),
        group_labels={"backbone": "VAE", "config.protocol.name": "protocol"},
        position=30,
    )

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, cfg, val_set = job.pipe, job.cfg, job.val_set
        if not hasattr(pipe.backbone, "decode"):
            raise UpbenchError(f"task=generative needs a VAE backbone (backbone=taef2 or backbone=sd15_vae), "
                               f"got '{pipe.backbone.name}'")
        factor = int(cfg["factor"])
        sr, hr = [], []
        for i in bar(range(len(val_set)), desc="images"):
            image = val_set[i]["image"][None].to(job.device)
            out = super_resolve(pipe, downsample(image, factor), factor, bool(cfg["color_correction"]))
            if out.shape != image.shape:
                raise UpbenchError(f"generative: decoded size {tuple(out.shape)} != high-res crop {tuple(image.shape)}")
            sr.append(out[0].cpu())
            hr.append(image[0].cpu())
            if (i + 1) % 10 == 0:
                job.log(f"  {i + 1}/{len(val_set)} images")
        metrics = image_metrics.summary(sr, hr, int(cfg["pfid_patch"]), with_fid=bool(cfg["fid"]), device=job.device)
        return {
            "metrics": metrics,
            "data": {"n_val": len(val_set), "hr_size": val_set.img_size, "lr_size": val_set.img_size // factor,
                     "factor": factor, "fid_resize": image_metrics.FID_RESIZE_MODE if cfg["fid"] else None,
                     "pfid_patch": int(cfg["pfid_patch"]), "color_correction": bool(cfg["color_correction"]),
                     "ssim": image_metrics.SSIM_SETTINGS},
        }
