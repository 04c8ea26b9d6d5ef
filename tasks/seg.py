"""Semantic-segmentation linear probe (the JAFAR protocol): frozen backbone + frozen upsampler, a
``Conv2d(C, K, 1)`` probe trained with AdamW, CE ignoring 255; pixel accuracy (micro) and mIoU (macro)."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn
from torch.nn import functional as F

from upbench.errors import UpbenchError

from . import register
from .common import FeatureSource, resize_prediction, timing_summary, train_probe


@register("seg")
def run_seg(cfg: Dict[str, Any], backbone, upsampler, train_set, val_set, device: torch.device, cache,
            log=print) -> Dict[str, Any]:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    if getattr(train_set, "kind", "seg") != "seg":
        raise UpbenchError(f"task=seg needs a segmentation dataset; '{train_set.name}' is a {train_set.kind} dataset "
                           f"(use task={train_set.kind})")
    probe_cfg = cfg["probe"]
    num_classes, ignore = train_set.num_classes, train_set.ignore_index
    size = (train_set.img_size, train_set.img_size)
    budget = float(cfg["cache"]["upsampled_gb"])
    source = FeatureSource(backbone, upsampler, device, cache, train_set.img_size, cfg["guidance_norm"], budget)

    probe = nn.Conv2d(backbone.channels, num_classes, 1).to(device)

    def batch_loss(items, flips, _step):
        feats = torch.stack([source.high_res(it, f, size) for it, f in zip(items, flips)]).to(device)
        labels = torch.stack([it["label"].flip(-1) if f else it["label"] for it, f in zip(items, flips)])
        logits = resize_prediction(probe(feats), labels.shape[-2:])
        return F.cross_entropy(logits, labels.to(device), ignore_index=ignore)

    epoch_s, losses = train_probe(train_set, probe_cfg, probe.parameters(), cfg["seed"], batch_loss, log,
                                  checkpoint=cfg.get("checkpoint"))

    miou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=ignore).to(device)
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=ignore).to(device)
    with torch.inference_mode():
        for i in range(len(val_set)):
            item = val_set[i]
            feats = source.high_res(item, False, (val_set.img_size, val_set.img_size))[None].to(device)
            label = item["label"][None].to(device)
            pred = resize_prediction(probe(feats), label.shape[-2:]).argmax(1)
            miou.update(pred, label)
            acc.update(pred, label)
    return {
        "metrics": {"miou": float(miou.compute()) * 100, "acc": float(acc.compute()) * 100,
                    "final_train_loss": losses[-1] if losses else None},
        "timing": {"upsampler_ms": timing_summary(source.upsampler_s),
                   "backbone_ms": timing_summary(source.backbone_s),
                   "probe_epoch_s": sum(epoch_s) / max(1, len(epoch_s)),
                   "probe_epochs_s": epoch_s,
                   "upsampled_cached": source.caches_upsampled},
        "data": {"n_train": len(train_set), "n_val": len(val_set), "img_size": train_set.img_size,
                 "num_classes": num_classes},
    }
