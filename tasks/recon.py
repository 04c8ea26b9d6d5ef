"""Feature reconstruction: upsample the features of an image at resolution R by 2x and compare them with the
backbone's own features of the same image at 2R (the self-supervision target of UPLiFT / LiFT training).

Reports MSE and mean cosine similarity per image, averaged; the guidance image is the R-resolution image."""
from __future__ import annotations

import time
from typing import Any, Dict

import torch
from torch.nn import functional as F

from . import register
from .common import normalize, timing_summary


@register("recon")
def run_recon(cfg: Dict[str, Any], backbone, upsampler, train_set, val_set, device: torch.device, cache,
              log=print) -> Dict[str, Any]:
    factor = int(cfg.get("factor", 2))
    mse, cos, times = [], [], []
    with torch.inference_mode():
        for i in range(len(val_set)):
            full = val_set[i]["image"][None].to(device)                      # 2R
            H, W = full.shape[-2:]
            low = F.interpolate(full, size=(H // factor, W // factor), mode="bilinear", align_corners=False,
                                antialias=True)                                # R
            target, _ = backbone(normalize(full, backbone.mean, backbone.std))
            feats, _ = backbone(normalize(low, backbone.mean, backbone.std))
            guide = normalize(low, upsampler.image_mean, upsampler.image_std)
            t0 = time.perf_counter()
            pred = upsampler(guide, feats, tuple(target.shape[-2:]))
            times.append(time.perf_counter() - t0)
            mse.append(float(F.mse_loss(pred.float(), target.float())))
            cos.append(float(F.cosine_similarity(pred.float(), target.float(), dim=1).mean()))
    n = max(1, len(mse))
    return {"metrics": {"mse": sum(mse) / n, "cosine": sum(cos) / n},
            "timing": {"upsampler_ms": timing_summary(times)},
            "data": {"n_val": len(val_set), "img_size": val_set.img_size, "factor": factor}}
