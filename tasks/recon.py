"""Feature reconstruction: upsample the features of an image at resolution R by 2x and compare them with the
backbone's own features of the same image at 2R (the self-supervision target of UPLiFT / LiFT training).

Reports MSE and mean cosine similarity per image, averaged; the guidance image is the R-resolution image."""
from __future__ import annotations

from typing import Any, Dict

from torch.nn import functional as F

from upbench.protocols import Job, Metric, TableSpec, Task
from upbench.transforms import resize

from . import register


@register("recon")
class FeatureReconstruction(Task):
    dataset_kinds = None   # any set with images
    table = TableSpec(
        title="Feature reconstruction (2x, vs backbone features of the 2x image)",
        metrics=(Metric("mse", "MSE", "min", "{:.4f}"), Metric("cosine", "Cosine", "max", "{:.4f}")),
        position=50,
    )

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, val_set = job.pipe, job.val_set
        factor = int(job.cfg.get("factor", 2))
        mse, cos = [], []
        for i in range(len(val_set)):
            full = val_set[i]["image"][None].to(job.device)                    # 2R
            H, W = full.shape[-2:]
            low = resize(full, (H // factor, W // factor), antialias=True)   # R
            target, _ = pipe.encode(full)
            feats, _ = pipe.encode(low)
            pred = pipe.upsample(low, feats, tuple(target.shape[-2:]))
            mse.append(float(F.mse_loss(pred.float(), target.float())))
            cos.append(float(F.cosine_similarity(pred.float(), target.float(), dim=1).mean()))
        n = max(1, len(mse))
        return {"metrics": {"mse": sum(mse) / n, "cosine": sum(cos) / n},
                "data": {"n_val": len(val_set), "img_size": val_set.img_size, "factor": factor}}
