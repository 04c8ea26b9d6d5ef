"""Iterative-step stability (UPLiFT Fig. 10, bottom): for methods that upsample in repeated 2x steps (UPLiFT, LiFT),
how far each step's features drift from the backbone's low-resolution features.

For every validation image: the low-res features f (C, h, w), then ``steps`` 2x steps; step k (C, 2^k h, 2^k w) is
averaged back over each low-res cell (area downsampling, the exact inverse of the 2^k blow-up) and compared with f:
``drift_k`` = mean over cells of 1 - cos(f, step k); 0 means the step kept every cell's content.  Reported as the
mean over images.  The run also leaves a figure of the first image's steps under one joint PCA."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch.nn import functional as F

from upbench import plotting
from upbench.errors import UpbenchError
from upbench.protocols import Job, Metric, TableSpec, Task
from upbench.timing import Stopwatch, median_ms

from . import register

MAX_STEPS = 4


def drift(low: torch.Tensor, step: torch.Tensor) -> float:
    """Mean cosine distance between (C, h, w) ``low`` and (C, H, W) ``step`` averaged over each low-res cell."""
    back = F.adaptive_avg_pool2d(step[None].float(), tuple(low.shape[-2:]))[0]
    return float((1 - F.cosine_similarity(back, low.float().to(back.device), dim=0)).mean())


@register("stability")
class StepStability(Task):
    dataset_kinds = None   # any set with images
    table = TableSpec(
        title="Iterative-step stability (cosine drift from the low-res features)",
        metrics=tuple(Metric(f"drift_{k}", f"drift {2 ** k}x", "min", "{:.4f}") for k in range(1, MAX_STEPS + 1)),
        position=60,
    )

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, val_set = job.pipe, job.val_set
        model = pipe.upsampler
        if not getattr(model, "iterative", False) or not hasattr(model, "forward_steps"):
            raise UpbenchError(f"task=stability needs an iterative upsampler (one that upsamples in repeated 2x steps: "
                               f"lift, uplift); '{job.full_cfg['upsampler']['name']}' is not")
        steps = int(job.cfg.get("steps", MAX_STEPS))
        if not 1 <= steps <= MAX_STEPS:
            raise UpbenchError(f"task.steps must be between 1 and {MAX_STEPS}, got {steps}")
        per_image: List[List[float]] = []
        seconds: List[float] = []
        figure = None
        for i in range(len(val_set)):
            item = val_set[i]
            low, _ = pipe.item_features(item)
            with torch.inference_mode(), Stopwatch(job.device) as sw:
                outs = model.forward_steps(pipe.guidance(item["image"][None]), low[None].to(job.device), steps)
            seconds.append(sw.seconds)
            per_image.append([drift(low, o[0].cpu()) for o in outs])
            if i == 0 and job.out_dir is not None:
                figure = self._figure(item, low, [o[0].cpu() for o in outs], per_image[0], job)
        metrics: Dict[str, Any] = {f"drift_{k + 1}": sum(d[k] for d in per_image) / len(per_image)
                                   for k in range(steps)}
        return {"metrics": metrics, "timing": {"steps_ms": median_ms(seconds)},
                "data": {"n_val": len(val_set), "steps": steps, "img_size": getattr(val_set, "img_size", None),
                         "downsampling": "area (adaptive average pooling to the low-res grid)"},
                "artefacts": {"figure": figure} if figure else {}}

    @staticmethod
    def _figure(item: Dict[str, Any], low: torch.Tensor, outs: List[torch.Tensor], drifts: List[float],
                job: Job) -> str:
        size = tuple(outs[-1].shape[-2:])
        pca = plotting.JointPCA([low] + outs)
        image = F.interpolate(item["image"][None].float(), size=size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        panels = [("image", plotting.to_display(image)), (f"low-res {tuple(low.shape[-2:])}", pca.rgb(low))]
        panels += [(f"step {k + 1} ({2 ** (k + 1)}x): drift {d:.3f}", pca.rgb(o)) for k, (o, d) in
                   enumerate(zip(outs, drifts))]
        name = job.full_cfg["upsampler"]["name"]
        paths = plotting.panels(panels, job.out_dir / "steps", title=f"{name}: every 2x step under one joint PCA")
        return paths[0]
